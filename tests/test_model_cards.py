"""The model cards: metadata that huggingface_hub parses, the published numbers, and a usage snippet that runs."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

from helpers import run_without_maft, tiny_model, tiny_processor
from maft.inference import encode_vocabulary, segment_image
from maft.utils.model_card import maft_model_card
from maft.cli.model_loading import default_model_path, load_model_and_processor


REPO_ROOT = Path(__file__).resolve().parents[1]
CARDS = REPO_ROOT / "model_cards"
PUBLISHED = {  # DESIGN.md §6, PC-459, PC-59, PAS-20
    "maft-vit-b16-coco-stuff": [10.25, 29.14, 12.85, 53.33, 90.44],
    "maft-vit-l14-coco-stuff": [12.12, 32.05, 15.68, 58.01, 92.14],
    "freeseg-vit-b16-coco-stuff": [7.1, 17.9, 6.4, 34.4, 85.6],
}


def assert_hub_metadata(card: ModelCard) -> None:
    """Loadable with transformers (remote code); "image-segmentation" is the Hub task nearest to the pipeline's."""
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags
    assert card.data.pipeline_tag == "image-segmentation"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_card_metadata(name):
    card = ModelCard.load(CARDS / f"{name}.md")
    assert_hub_metadata(card)
    assert card.data.model_name == name
    assert [result.metric_value for result in card.data.eval_results] == PUBLISHED[name]
    assert {result.metric_type for result in card.data.eval_results} == {"mIoU"}


def usage_snippet(text: str) -> str:
    return re.search(r"## Use\n\n.*?```python\n(.*?)```", text, re.DOTALL).group(1)


@pytest.mark.parametrize("name", [*sorted(PUBLISHED), "generated"])
def test_card_usage_snippet_runs(name, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    text = maft_model_card(name, "text").content if name == "generated" else (CARDS / f"{name}.md").read_text()
    snippet, replaced = re.subn(r'model_id = "[^"]+"', f'model_id = "{tmp_path}"', usage_snippet(text))
    assert replaced == 1
    namespace = {}
    exec(snippet, namespace)
    assert tuple(namespace["label_map"].shape) == (480, 640)
    assert {segment["label"] for segment in namespace["segments"]} <= {"sky", "tree", "road"}
    assert all(segment["mask"].size == (640, 480) for segment in namespace["segments"])


def test_generated_card_metadata():
    assert_hub_metadata(maft_model_card("user/model", "text"))


def test_the_bundled_model_card_states_what_the_reproduction_measured_and_its_snippet_runs_as_written(tmp_path):
    """As written, in a checkout of maft, with transformers alone."""
    card = ModelCard.load(CARDS / "maft-mini.md")
    assert_hub_metadata(card)
    assert card.data.license == "apache-2.0" and card.data.model_name == "maft-mini"
    seen, unseen, harmonic = (result.metric_value for result in card.data.eval_results)
    assert 0 < unseen <= 100 and 0 < seen <= 100
    assert abs(harmonic - 2 * seen * unseen / (seen + unseen)) < 0.1
    report = "\nprint(json.dumps([label_map.tolist(), [segment['label'] for segment in segments], 'maft' in sys.modules]))"
    output = run_without_maft("import json\n" + usage_snippet(card.text) + report, tmp_path, cwd=REPO_ROOT)
    label_map, labels, maft_imported = json.loads(output.strip().splitlines()[-1])
    model, processor = load_model_and_processor()
    class_names = ["checkered wall", "dotted floor", "dotted grass", "red circle"]
    expected = segment_image(model, processor, default_model_path().parent / "examples" / "scene-4.png",
                             encode_vocabulary(model, processor, class_names))
    np.testing.assert_array_equal(np.array(label_map), expected)
    assert labels == [name for index, name in enumerate(class_names) if (expected == index).any()] and not maft_imported


def test_the_docs_show_the_bundled_cards_snippet():
    """The documentation's transformers-only snippet is the one the test above runs without maft."""
    page = (REPO_ROOT / "docs" / "pipeline.md").read_text()
    section = page[page.index("## Use a shared model with transformers only"):]
    shown = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert shown == usage_snippet((CARDS / "maft-mini.md").read_text())

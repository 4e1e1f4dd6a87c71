"""The model cards: metadata that huggingface_hub parses, the published numbers, and a usage snippet that runs."""

import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from helpers import tiny_model, tiny_processor


CARDS = Path(__file__).resolve().parents[1] / "model_cards"
PUBLISHED = {  # DESIGN.md §6, PC-459, PC-59, PAS-20
    "maft-vit-b16-coco-stuff": [10.25, 29.14, 12.85, 53.33, 90.44],
    "maft-vit-l14-coco-stuff": [12.12, 32.05, 15.68, 58.01, 92.14],
    "freeseg-vit-b16-coco-stuff": [7.1, 17.9, 6.4, 34.4, 85.6],
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_card_metadata(name):
    card = ModelCard.load(CARDS / f"{name}.md")
    assert card.data.pipeline_tag == "image-segmentation" and card.data.library_name == "maft"
    assert card.data.model_name == name
    assert [result.metric_value for result in card.data.eval_results] == PUBLISHED[name]
    assert {result.metric_type for result in card.data.eval_results} == {"mIoU"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_card_usage_snippet_runs(name, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    text = (CARDS / f"{name}.md").read_text()
    snippet = re.search(r"## Use\n\n```python\n(.*?)```", text, re.DOTALL).group(1)
    snippet, replaced = re.subn(r'model_id = "[^"]+"', f'model_id = "{tmp_path}"', snippet)
    assert replaced == 1
    namespace = {}
    exec(snippet, namespace)
    assert tuple(namespace["label_map"].shape) == (480, 640)


def test_the_bundled_model_card_states_what_the_reproduction_measured_and_its_snippet_runs_as_written():
    card = ModelCard.load(CARDS / "maft-mini.md")
    assert card.data.pipeline_tag == "image-segmentation" and card.data.library_name == "maft"
    assert card.data.license == "apache-2.0" and card.data.model_name == "maft-mini"
    seen, unseen, harmonic = (result.metric_value for result in card.data.eval_results)
    assert 0 < unseen <= 100 and 0 < seen <= 100
    assert abs(harmonic - 2 * seen * unseen / (seen + unseen)) < 0.1
    snippet = re.search(r"## Use\n\n```python\n(.*?)```", card.text, re.DOTALL).group(1)
    namespace = {}
    exec(snippet, namespace)
    assert tuple(namespace["label_map"].shape) == (96, 96)

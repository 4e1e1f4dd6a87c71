"""`evaluate_panoptic_on_dataset` and `maft evaluate --task panoptic|instance`: the bundled model on miniature scenes
with COCO-panoptic annotations, in one process and sharded over two."""

import json

import pytest

from helpers import bundled_model, launch_two_processes
from maft.evaluation.dataset_evaluation import evaluate_panoptic_on_dataset
from maft.cli.model_loading import default_model_path
from maft.miniature.world import CLASS_NAMES, THING_CLASSES, UNSEEN_CLASS_NAMES, SceneSpec, build_dataset
from maft.data.segmentation_data import rgb_to_segment_ids


THING_IDS = list(range(len(THING_CLASSES)))


@pytest.fixture(scope="module")
def scenes():
    return build_dataset("test", 5, seed=0, spec=SceneSpec(size=96))


def test_predicting_the_annotation_scores_100(scenes, monkeypatch):
    model, processor = bundled_model()
    annotations = iter(scenes)

    def the_annotation(outputs, target_sizes, **kwargs):
        results = []
        for size in target_sizes:
            example = next(annotations)
            segment_ids = rgb_to_segment_ids(example["panoptic"])
            assert segment_ids.shape == tuple(size)
            results.append({"segmentation": segment_ids, "segments_info": [
                {"id": segment["id"], "label_id": segment["category_id"], "was_fused": False, "score": 1.0}
                for segment in example["segments_info"]]})
        return results

    monkeypatch.setattr(processor.image_processor, "post_process_panoptic_segmentation", the_annotation, raising=False)
    results = evaluate_panoptic_on_dataset(model, processor, scenes, CLASS_NAMES, THING_IDS, "panoptic", UNSEEN_CLASS_NAMES, batch_size=2)
    assert results["PQ"] == results["PQ-things"] == results["PQ-stuff"] == results["hPQ"] == 100.0


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_the_bundled_model_scores_and_batches_give_the_numbers_of_one_image_at_a_time(scenes, task):
    model, processor = bundled_model()
    one = evaluate_panoptic_on_dataset(model, processor, scenes, CLASS_NAMES, THING_IDS, task, UNSEEN_CLASS_NAMES, batch_size=1)
    batched = evaluate_panoptic_on_dataset(model, processor, scenes, CLASS_NAMES, THING_IDS, task, UNSEEN_CLASS_NAMES, batch_size=3)
    assert json.dumps(batched) == json.dumps(one)
    headline = "PQ" if task == "panoptic" else "AP"
    assert 0 < one[headline] < 100, one  # the bundled model finds some segments, not all
    with pytest.raises(ValueError, match="`task` must be one of panoptic, instance"):
        evaluate_panoptic_on_dataset(model, processor, scenes, CLASS_NAMES, THING_IDS, "semantic")


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_evaluate_command_in_one_and_two_processes(tmp_path, scenes, task, capsys):
    from maft.cli import main

    scenes.save_to_disk(str(tmp_path / "data"))
    for part in bundled_model():
        part.save_pretrained(tmp_path / "model")
    arguments = ["evaluate", "--task", task, "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"),
                 "--unseen-class-names", ", ".join(UNSEEN_CLASS_NAMES)]
    assert main([*arguments, "--output", str(tmp_path / "one.json")]) == 0
    table = capsys.readouterr().out
    assert ("| PQ | SQ | RQ | PQ-things |" if task == "panoptic" else "| AP | AP50 | AP75 | AP-seen | AP-unseen | hAP |") in table
    result = launch_two_processes(["-m", "maft", *arguments, "--output", str(tmp_path / "two.json")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "maft: process 1 of 2 evaluates 2 of 5 examples" in result.stderr
    assert json.loads((tmp_path / "two.json").read_text()) == pytest.approx(json.loads((tmp_path / "one.json").read_text()), nan_ok=True)


def test_evaluate_command_errors_are_one_line(tmp_path, scenes, capsys):
    from maft.cli import main

    scenes.remove_columns(["panoptic", "segments_info"]).save_to_disk(str(tmp_path / "semantic"))
    assert main(["evaluate", "--task", "panoptic", "--model", str(default_model_path()), "--dataset", str(tmp_path / "semantic")]) != 0
    assert "need a dataset with the columns panoptic and segments_info" in capsys.readouterr().err.replace("\n", " ")
    assert main(["evaluate", "--threshold", "0.3", "--model", str(default_model_path()), "--dataset", str(tmp_path / "semantic")]) != 0
    assert "--threshold applies to --task panoptic or instance" in capsys.readouterr().err

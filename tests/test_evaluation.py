"""The segmentation metrics against hand-made confusion matrices, and the offline `evaluate` module."""

import json
import math

import evaluate
import numpy as np
import pytest
import torch

from maft.metrics import MEAN_IOU_METRIC_PATH
from maft.evaluation.metrics import StreamingConfusionMatrix, format_results_table


def example():
    # Classes: 0 and 1 in the ground truth, 2 only predicted, 3 nowhere; 255 ignored.
    references = np.array([[0, 0, 0, 1], [1, 1, 255, 255]])
    predictions = np.array([[0, 0, 1, 1], [1, 2, 2, 0]])
    return predictions, references


def test_metrics_by_hand():
    matrix = StreamingConfusionMatrix(4, ignore_index=255)
    matrix.update(*example())
    # Valid pixels (gt, pred): (0,0) (0,0) (0,1) (1,1) (1,1) (1,2).
    assert matrix.matrix.tolist() == [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    results = matrix.compute(["cat", "dog", "sky", "road"])
    iou = {"cat": 2 / 3, "dog": 2 / 4, "sky": 0.0}
    assert results["IoU-cat"] == pytest.approx(100 * iou["cat"])
    assert results["IoU-sky"] == 0.0  # only predicted: counts, as 0
    assert math.isnan(results["IoU-road"])  # absent from both: left out
    assert results["mIoU"] == pytest.approx(100 * sum(iou.values()) / 3)
    assert results["fwIoU"] == pytest.approx(100 * (iou["cat"] * 3 + iou["dog"] * 3) / 6)
    assert results["mACC"] == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)
    assert results["pACC"] == pytest.approx(100 * 4 / 6)
    assert "| mIoU | fwIoU | mACC | pACC |" in format_results_table(results)


def test_seen_unseen_and_harmonic_mean():
    matrix = StreamingConfusionMatrix(4)
    matrix.update(*example())
    results = matrix.compute(["cat", "dog", "sky", "road"], unseen_class_names=["dog", "road"])
    seen, unseen = 100 * (2 / 3 + 0.0) / 2, 100 * 0.5
    assert results["mIoU-seen"] == pytest.approx(seen) and results["mIoU-unseen"] == pytest.approx(unseen)
    assert results["hIoU"] == pytest.approx(2 * seen * unseen / (seen + unseen))
    with pytest.raises(ValueError, match="not among the class names: \\['bird'\\]"):
        matrix.compute(["cat", "dog", "sky", "road"], unseen_class_names=["bird"])


def test_streaming_batches_and_merging_agree():
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randint(0, 5, (3, 8, 9), generator=generator)
    references = torch.randint(0, 6, (3, 8, 9), generator=generator)
    references[references == 5] = 255
    whole = StreamingConfusionMatrix(5)
    whole.update(predictions, references)
    parts = [StreamingConfusionMatrix(5) for _ in range(3)]
    for part, prediction, reference in zip(parts, predictions, references):
        part.update(prediction, reference)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.equal(whole.matrix, merged.matrix)
    assert whole.matrix.sum() == (references != 255).sum()


def test_bad_inputs():
    matrix = StreamingConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside \\[0, 2\\]"):
        matrix.update(np.array([[0, 3]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="differ in shape"):
        matrix.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="same classes"):
        matrix.merge(StreamingConfusionMatrix(4))


def test_evaluate_module_loads_offline_and_agrees():
    metric = evaluate.load(MEAN_IOU_METRIC_PATH)
    predictions, references = example()
    results = metric.compute(predictions=[predictions], references=[references], num_labels=4, ignore_index=255,
                             class_names=["cat", "dog", "sky", "road"])
    direct = StreamingConfusionMatrix(4)
    direct.update(predictions, references)
    expected = direct.compute(["cat", "dog", "sky", "road"])
    assert results["mIoU"] == pytest.approx(expected["mIoU"]) and results["pACC"] == pytest.approx(expected["pACC"])



def test_batched_evaluation_of_equal_sized_images_equals_one_at_a_time():
    from helpers import bundled_model, bundled_scenes
    from maft.evaluation import evaluate_on_dataset

    dataset, classes = bundled_scenes([(96, 96)] * 5)  # 5: the last batch of 2 is short
    model, processor = bundled_model()
    class_names, unseen = classes["class_names"], classes["unseen_class_names"]
    one_at_a_time = evaluate_on_dataset(model, processor, dataset, class_names, unseen_class_names=unseen, batch_size=1)
    batched = evaluate_on_dataset(model, processor, dataset, class_names, unseen_class_names=unseen, batch_size=2)
    assert json.dumps(batched) == json.dumps(one_at_a_time)  # exact, NaN included
    assert 30 < one_at_a_time["mIoU"] < 100 and one_at_a_time["hIoU"] > 0  # the bundled model segments its scenes
    with pytest.raises(ValueError, match="`batch_size` must be at least 1, got 0"):
        evaluate_on_dataset(model, processor, dataset, class_names, batch_size=0)


def test_a_batch_of_different_sizes_predicts_each_image_at_its_own_size():
    from helpers import bundled_model, bundled_scenes
    from maft.evaluation import evaluate_on_dataset

    dataset, classes = bundled_scenes([(96, 96), (64, 128), (112, 80)])
    model, processor = bundled_model()
    one_at_a_time = evaluate_on_dataset(model, processor, dataset, classes["class_names"], batch_size=1)
    batched = evaluate_on_dataset(model, processor, dataset, classes["class_names"], batch_size=3)
    # Each prediction has its own label map's size (StreamingConfusionMatrix.update refuses others), and each image is
    # segmented at its own padded size: the metrics of one image at a time (before that, pACC moved by 1.7 points).
    assert json.dumps(batched) == json.dumps(one_at_a_time)


@pytest.mark.parametrize("num_examples", [5, 1], ids=["uneven shards", "fewer examples than processes"])
def test_two_processes_evaluate_each_example_once_with_the_numbers_of_one(tmp_path, num_examples):
    from helpers import bundled_model, bundled_scenes, launch_two_processes, save_labelled_dataset
    from maft.cli import main

    examples, classes = bundled_scenes([(96, 96), (64, 128), (112, 80), (96, 72), (80, 96)][:num_examples])
    save_labelled_dataset(examples, tmp_path / "data")
    for part in bundled_model():
        part.save_pretrained(tmp_path / "model")
    arguments = ["evaluate", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"),
                 "--class-names", ", ".join(classes["class_names"]),
                 "--unseen-class-names", ", ".join(classes["unseen_class_names"])]
    assert main([*arguments, "--output", str(tmp_path / "one.json")]) == 0
    result = launch_two_processes(["-m", "maft", *arguments, "--output", str(tmp_path / "two.json")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank, size in enumerate([(num_examples + 1) // 2, num_examples // 2]):
        assert f"maft: process {rank} of 2 evaluates {size} of {num_examples} examples" in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("| mIoU |") == 1  # the main process reports
    assert (tmp_path / "two.json").read_text() == (tmp_path / "one.json").read_text()
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["mIoU"] > 10 and one["pACC"] > 30  # the bundled model's predictions, not a constant class
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "model", "one.json", "two.json"]  # no temporary file left

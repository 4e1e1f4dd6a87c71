"""The segmentation metrics against hand-made confusion matrices, and the offline `evaluate` module."""

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

"""PQ / SQ / RQ and COCO mask AP on hand-made cases, and on random cases against the reference libraries (torchmetrics'
`PanopticQuality`, faster-coco-eval's `COCOeval_faster`)."""

import math

import numpy as np
import pytest
import torch

from maft.evaluation.panoptic_metrics import StreamingMaskAP, StreamingPanopticQuality


def segments(classes: dict[int, int], crowd: tuple[int, ...] = ()) -> list[dict]:
    return [{"id": segment_id, "category_id": label, "iscrowd": int(segment_id in crowd)} for segment_id, label in classes.items()]


def prediction(segmentation, classes: dict[int, int], scores: dict[int, float] | None = None) -> dict:
    return {"segmentation": torch.as_tensor(segmentation),
            "segments_info": [{"id": segment_id, "label_id": label, "was_fused": False, "score": (scores or {}).get(segment_id, 1.0)}
                              for segment_id, label in classes.items()]}


def test_perfect_prediction_is_100():
    reference = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]])
    quality = StreamingPanopticQuality(3, thing_class_ids=[0])
    quality.update(prediction(reference, {1: 0, 2: 0, 3: 2}), reference, segments({1: 0, 2: 0, 3: 2}))
    results = quality.compute(["cat", "dog", "sky"])
    assert results["PQ"] == results["SQ"] == results["RQ"] == results["PQ-things"] == results["PQ-stuff"] == 100.0
    assert math.isnan(results["PQ-dog"])  # neither in the reference nor predicted: left out of the averages


def test_matching_by_hand():
    # Reference (4 x 5): thing instances 1 and 2 of class 0, stuff 3 of class 1 on the bottom row.
    reference = np.array([[1, 1, 1, 2, 2],
                          [1, 1, 1, 2, 2],
                          [1, 1, 1, 2, 2],
                          [3, 3, 3, 3, 3]])
    # Prediction: 10 covers instance 1 and one pixel of stuff (IoU 9 / 10); 20 covers 2 of instance 2's 6 pixels
    # (IoU 2 / 6: no match); 30 is the rest of the stuff row and instance 2, as class 1 (IoU 4 / 8: not above 0.5).
    predicted = np.array([[10, 10, 10, 20, 30],
                          [10, 10, 10, 20, 30],
                          [10, 10, 10, 30, 30],
                          [10, 30, 30, 30, 30]])
    quality = StreamingPanopticQuality(2, thing_class_ids=[0])
    quality.update(prediction(predicted, {10: 0, 20: 0, 30: 1}), reference, segments({1: 0, 2: 0, 3: 1}))
    # class 0: TP 1 (IoU 0.9), FP 1 (20), FN 1 (instance 2); class 1: FP 1 (30), FN 1 (3)
    assert quality.counts.tolist() == [[0.9, 0.0], [1, 0], [1, 1], [1, 1]]
    results = quality.compute(["thing", "stuff"])
    pq_thing = 0.9 * 1 / (1 + 0.5 + 0.5)
    assert results["PQ-things"] == pytest.approx(100 * pq_thing) and results["PQ-stuff"] == 0.0
    assert results["PQ"] == pytest.approx(100 * pq_thing / 2)
    assert results["SQ-things"] == pytest.approx(90.0) and results["RQ-things"] == pytest.approx(50.0)


def test_void_pixels_leave_the_union_and_a_prediction_mostly_on_void_is_no_false_positive():
    # 0 is void in the reference. Prediction 5 covers instance 1 and two void pixels: union = 4 + 6 - 4 - 2 = 4.
    reference = np.array([[1, 1, 0, 0, 0],
                          [1, 1, 0, 0, 0]])
    predicted = np.array([[5, 5, 5, 6, 6],
                          [5, 5, 5, 6, 7]])
    quality = StreamingPanopticQuality(2, thing_class_ids=[0, 1])
    quality.update(prediction(predicted, {5: 0, 6: 1, 7: 0}), reference, segments({1: 0}))
    # 6 and 7 lie wholly on void: neither is a false positive
    assert quality.counts.tolist() == [[1.0, 0.0], [1, 0], [0, 0], [0, 0]]


def test_crowd_regions_are_never_matched_nor_missed_and_absorb_predictions_of_their_class():
    reference = np.array([[1, 1, 2, 2],
                          [1, 1, 2, 2]])
    # 2 is a crowd region of class 0. Prediction 8 (class 0) lies on it: neither a match nor a false positive;
    # prediction 9 (class 1) on the crowd of class 0 is a false positive of class 1.
    quality = StreamingPanopticQuality(2, thing_class_ids=[0, 1])
    quality.update(prediction(np.array([[7, 7, 8, 8], [7, 7, 9, 9]]), {7: 0, 8: 0, 9: 1}), reference,
                   segments({1: 0, 2: 0}, crowd=(2,)))
    assert quality.counts.tolist() == [[1.0, 0.0], [1, 0], [0, 1], [0, 0]]


def test_unassigned_predicted_pixels_and_seen_unseen_groups():
    reference = np.array([[1, 1, 2, 2]])
    # -1 (Mask2Former's "nothing") over half of segment 2: IoU of 4 with 2 is 1 / 2, not above 0.5
    quality = StreamingPanopticQuality(2, thing_class_ids=[0])
    quality.update(prediction(np.array([[3, 3, -1, 4]]), {3: 0, 4: 1}), reference, segments({1: 0, 2: 1}))
    results = quality.compute(["circle", "grass"], unseen_class_names=["grass"])
    assert results["PQ-seen"] == 100.0 and results["PQ-unseen"] == 0.0 and results["hPQ"] == 0.0
    assert results["PQ"] == 50.0


def test_bad_inputs_say_what_is_wrong():
    quality = StreamingPanopticQuality(2, thing_class_ids=[0])
    reference = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="label_id 5 is not a class index in \\[0, 1\\]"):
        quality.update(prediction(reference, {0: 5}), reference, [])
    with pytest.raises(ValueError, match="differ in size"):
        quality.update(prediction(np.zeros((3, 2)), {}), reference, [])
    with pytest.raises(ValueError, match="more than once"):
        quality.update(prediction(reference, {}), reference, segments({1: 0}) * 2)
    with pytest.raises(ValueError, match="Thing class 7"):
        StreamingPanopticQuality(2, thing_class_ids=[7])


THINGS, STUFFS, VOID = (0, 1, 2), (3, 4), 9


def random_panoptic_pair(rng: np.random.Generator, size: int = 24, block: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(reference, prediction) as (H, W, 2) maps of (class, instance): blocks of a few thing instances and stuff
    regions (one per stuff class), void in the reference; the prediction is the reference with some blocks taken
    over by other segments and some segments' classes changed, and covers every pixel."""
    cells = size // block
    palette = [(thing, instance) for thing in THINGS for instance in range(1, 3)] + [(stuff, 0) for stuff in STUFFS]
    reference = np.array(palette + [(VOID, 0)])[rng.integers(len(palette) + 1, size=(cells, cells))]
    reference = reference.repeat(block, 0).repeat(block, 1)
    predicted = reference.copy()
    predicted[predicted[..., 0] == VOID] = palette[rng.integers(len(palette))]
    for row, column in rng.integers(cells, size=(rng.integers(2, 10), 2)):
        predicted[row * block : (row + 1) * block, column * block : (column + 1) * block] = palette[rng.integers(len(palette))]
    for _ in range(rng.integers(0, 3)):  # a segment predicted as another class of its kind
        category, instance = palette[rng.integers(len(palette))]
        selected = (predicted[..., 0] == category) & (predicted[..., 1] == instance)
        predicted[selected, 0] = rng.choice(THINGS if category in THINGS else STUFFS)
    # pixel-level noise at one block's edge, so that IoUs are not multiples of a block
    predicted[rng.integers(size), :] = palette[rng.integers(len(palette))]
    return reference, predicted


def to_segments(pairs: np.ndarray, category_key: str) -> tuple[np.ndarray, list[dict]]:
    """(H, W, 2) (class, instance) -> (H, W) segment ids and segments_info; void class -> id 0, listed nowhere."""
    keys, inverse = np.unique(pairs.reshape(-1, 2), axis=0, return_inverse=True)
    ids = np.arange(1, len(keys) + 1)
    info = [{"id": int(segment_id), category_key: int(category), "iscrowd": 0, "score": 1.0}
            for segment_id, (category, _) in zip(ids, keys) if category != VOID]
    ids = np.where(keys[:, 0] == VOID, 0, ids)
    return ids[inverse.ravel()].reshape(pairs.shape[:2]), info


def test_panoptic_quality_equals_torchmetrics_on_random_cases():
    from torchmetrics.detection import PanopticQuality

    rng = np.random.default_rng(0)
    pairs = [random_panoptic_pair(rng) for _ in range(12)]
    reference_metric = PanopticQuality(things=set(THINGS), stuffs=set(STUFFS), return_sq_and_rq=True, return_per_class=True)
    quality = StreamingPanopticQuality(5, thing_class_ids=THINGS)
    for reference, predicted in pairs:
        reference_metric.update(torch.as_tensor(predicted)[None], torch.as_tensor(reference)[None])
        reference_ids, reference_info = to_segments(reference, "category_id")
        predicted_ids, predicted_info = to_segments(predicted, "label_id")
        quality.update({"segmentation": predicted_ids, "segments_info": predicted_info}, reference_ids, reference_info)
    expected = reference_metric.compute().double()  # (classes, 3): PQ, SQ, RQ per class, classes sorted
    pq, sq, rq, occurs = quality.per_class()
    assert occurs.all()
    assert torch.stack([pq, sq, rq], dim=1) == pytest.approx(expected, abs=1e-6)
    results = quality.compute()
    assert results["PQ"] == pytest.approx(100 * expected[:, 0].mean().item())
    assert results["PQ-things"] == pytest.approx(100 * expected[: len(THINGS), 0].mean().item())
    assert 0 < results["PQ"] < 100 and quality.counts[2].sum() > 0 and quality.counts[3].sum() > 0  # not trivial


def test_streams_merge_to_the_whole():
    rng = np.random.default_rng(1)
    pairs = [[to_segments(pair, key) for pair, key in zip(random_panoptic_pair(rng), ("category_id", "label_id"))] for _ in range(4)]
    whole, parts = StreamingPanopticQuality(5, THINGS), [StreamingPanopticQuality(5, THINGS) for _ in range(2)]
    for index, ((reference_ids, reference_info), (predicted_ids, predicted_info)) in enumerate(pairs):
        for metric in (whole, parts[index % 2]):
            metric.update({"segmentation": predicted_ids, "segments_info": predicted_info}, reference_ids, reference_info)
    assert torch.allclose(parts[0].merge(parts[1]).counts, whole.counts)  # up to the order of summation


def instance_image(reference: np.ndarray, masks: list[np.ndarray], labels: list[int], scores: list[float]) -> dict:
    """A `post_process_instance_segmentation` output with binary maps."""
    return {"segmentation": torch.as_tensor(np.stack(masks) if masks else np.zeros((0, *reference.shape))),
            "segments_info": [{"id": index, "label_id": label, "was_fused": False, "score": score}
                              for index, (label, score) in enumerate(zip(labels, scores))]}


def test_mask_ap_by_hand():
    reference = np.zeros((10, 10), dtype=np.int64)
    reference[:5, :5] = 1  # one instance of class 0, 25 pixels
    reference[6:, 6:] = 2  # a crowd region of class 0
    detection = np.zeros((10, 10), dtype=bool)
    detection[:5, :4] = True
    detection[5, :3] = True  # IoU 20 / 28 = 0.714: a match at 0.5 ... 0.7, not at 0.75 ... 0.95
    on_crowd = reference == 2
    metric = StreamingMaskAP(2, thing_class_ids=[0])
    metric.update(instance_image(reference, [detection, on_crowd], [0, 0], [0.9, 0.95]), reference,
                  segments({1: 0, 2: 0}, crowd=(2,)))
    results = metric.compute(["circle", "grass"])
    # the detection on the crowd region is ignored; the other matches at 5 of the 10 thresholds
    assert results["AP50"] == pytest.approx(100.0) and results["AP75"] == pytest.approx(0.0)
    assert results["AP"] == pytest.approx(50.0) and results["AP-circle"] == pytest.approx(50.0)

    metric = StreamingMaskAP(2, thing_class_ids=[0])
    false_positive = np.zeros((10, 10), dtype=bool)
    false_positive[8:, :3] = True
    metric.update(instance_image(reference, [detection, false_positive], [0, 0], [0.5, 0.9]), reference, segments({1: 0}))
    # the higher-scored false positive comes first: precision 1/2 at recall 1
    assert metric.compute()["AP50"] == pytest.approx(50.0, abs=0.5)


def test_mask_ap_reads_segment_id_maps_and_leaves_out_stuff():
    reference = np.array([[1, 1, 3, 3], [1, 1, 3, 3]])
    metric = StreamingMaskAP(2, thing_class_ids=[0])
    # Mask2Former's instance map: -1 is nothing; segment 0 is the thing, segment 1 a stuff class (left out)
    metric.update(prediction(np.array([[0, 0, 1, 1], [0, 0, 1, 1]]) - np.array([[0, 0, 0, 2], [0, 0, 0, 0]]), {0: 0, 1: 1}),
                  reference, segments({1: 0, 3: 1}))
    assert metric.compute()["AP"] == pytest.approx(100.0)


def test_mask_ap_equals_faster_coco_eval_on_random_cases():
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval.core import mask as reference_mask_utils

    rng = np.random.default_rng(0)
    metric = StreamingMaskAP(4, thing_class_ids=[0, 1, 2])
    images, annotations, detections = [], [], []
    for image_id in range(1, 9):
        reference, predicted = random_panoptic_pair(rng)
        reference[np.isin(reference[..., 0], STUFFS)] = (VOID, 0)  # things only here
        reference_ids, reference_info = to_segments(reference, "category_id")
        if reference_info:
            reference_info[0]["iscrowd"] = int(rng.random() < 0.3)
        masks, labels, scores = [], [], []
        for category, instance in np.unique(predicted.reshape(-1, 2), axis=0):
            if category in (0, 1, 2):
                masks.append((predicted[..., 0] == category) & (predicted[..., 1] == instance))
                labels.append(int(category))
                scores.append(float(rng.random()))
        metric.update(instance_image(reference_ids, masks, labels, scores), reference_ids, reference_info)

        images.append({"id": image_id, "height": reference_ids.shape[0], "width": reference_ids.shape[1]})
        for segment in reference_info:
            rle = reference_mask_utils.encode(np.asfortranarray((reference_ids == segment["id"]).astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": segment["category_id"],
                                "iscrowd": segment["iscrowd"], "segmentation": rle, "area": float(reference_mask_utils.area(rle)),
                                "bbox": reference_mask_utils.toBbox(rle).tolist()})
        for mask, label, score in zip(masks, labels, scores):
            detections.append({"image_id": image_id, "category_id": label, "score": score,
                               "segmentation": reference_mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))})
    ground_truth = COCO()
    ground_truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": index} for index in (0, 1, 2)]}
    ground_truth.createIndex()
    evaluation = COCOeval_faster(ground_truth, ground_truth.loadRes(detections), iouType="segm", print_function=lambda *_: None)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    results = metric.compute()
    assert 0 < results["AP"] < 100
    assert [results["AP"], results["AP50"], results["AP75"]] == pytest.approx(100 * np.array(evaluation.stats[:3]), abs=1e-6)

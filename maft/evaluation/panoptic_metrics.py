"""
Panoptic and instance segmentation metrics over predictions in Mask2Former's output format (`{"segmentation": segment
ids, "segments_info": [{"id", "label_id", "score", ...}]}`, as `MaftImageProcessor.post_process_panoptic_segmentation`
and `post_process_instance_segmentation` return them) and ground truth in the COCO panoptic layout (a map of segment
ids and `segments_info` with `id`, `category_id` (a class index) and `iscrowd`):

- `StreamingPanopticQuality`: PQ, SQ and RQ as panopticapi's `pq_compute` defines them (Kirillov et al., 2019);
- `StreamingMaskAP`: COCO mask AP, AP50 and AP75 over the thing classes, computed by pycocotools' `COCOeval`.

Both accumulate image by image and merge across the processes of `accelerate launch`.
"""

import contextlib
import io
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch

from .metrics import checked_class_names, harmonic_mean

def _as_numpy(array) -> np.ndarray:
    return array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _check_class_index(value: int, num_classes: int, what: str) -> int:
    if not 0 <= int(value) < num_classes:
        raise ValueError(f"{what} {value} is not a class index in [0, {num_classes - 1}].")
    return int(value)


def _segment_index_map(segmentation: np.ndarray, segment_ids: Sequence[int]) -> np.ndarray:
    """(H, W) segment ids -> (H, W) positions in `segment_ids`, -1 where the id is none of them (void)."""
    values, inverse = np.unique(segmentation, return_inverse=True)
    positions = {segment_id: position for position, segment_id in enumerate(segment_ids)}
    lookup = np.array([positions.get(int(value), -1) for value in values], dtype=np.int64)
    return lookup[inverse].reshape(segmentation.shape)


def _check_unique_ids(segments_info: Sequence[Mapping], what: str) -> list[int]:
    ids = [int(segment["id"]) for segment in segments_info]
    if len(set(ids)) != len(ids):
        raise ValueError(f"The {what} segments_info lists a segment id more than once: {sorted(ids)}.")
    return ids


class StreamingPanopticQuality:
    """
    Per-class true positives, false positives, false negatives and summed IoU of matched segments, accumulated image
    by image, as panopticapi counts them: a predicted and a ground-truth segment of the same class match when their
    IoU is above 0.5, where the union leaves out the predicted pixels on void ground truth; crowd segments are never
    matched, and an unmatched prediction lying more than half on void or on crowd regions of its class is not a false
    positive. `compute` gives PQ = SQ x RQ (SQ: mean IoU of the matches, RQ = TP / (TP + FP/2 + FN/2)) averaged over
    the classes that occur (TP + FP + FN > 0), over all, thing and stuff classes.

    The state is one (4, num_classes) float64 tensor (`counts`), so processes combine by summing it.
    """

    def __init__(self, num_classes: int, thing_class_ids: Collection[int]):
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be at least 1, got {num_classes}.")
        self.num_classes = num_classes
        self.thing_class_ids = sorted({_check_class_index(index, num_classes, "Thing class") for index in thing_class_ids})
        self.counts = torch.zeros(4, num_classes, dtype=torch.float64)  # rows: IoU sum, TP, FP, FN

    def update(self, prediction: Mapping, reference_segmentation, reference_segments_info: Sequence[Mapping]) -> None:
        """
        Adds one image. `prediction`: `{"segmentation": (H, W) segment ids, "segments_info": [{"id", "label_id"}]}`;
        pixels whose id is not in its segments_info (Mask2Former's 0 or -1) are predicted as nothing.
        `reference_segmentation` (H, W) segment ids and `reference_segments_info` `[{"id", "category_id", "iscrowd"}]`;
        pixels whose id is not listed are void.
        """
        predicted, reference = _as_numpy(prediction["segmentation"]).astype(np.int64), _as_numpy(reference_segmentation).astype(np.int64)
        if predicted.shape != reference.shape:
            raise ValueError(f"The predicted segmentation {predicted.shape} and the reference {reference.shape} differ in size.")
        predicted_info, reference_info = prediction["segments_info"], reference_segments_info
        predicted_classes = np.array([_check_class_index(segment["label_id"], self.num_classes, "Predicted label_id")
                                      for segment in predicted_info], dtype=np.int64)
        reference_classes = np.array([_check_class_index(segment["category_id"], self.num_classes, "Reference category_id")
                                      for segment in reference_info], dtype=np.int64)
        crowd = np.array([bool(segment.get("iscrowd", 0)) for segment in reference_info], dtype=bool)
        predicted_index = _segment_index_map(predicted, _check_unique_ids(predicted_info, "predicted"))
        reference_index = _segment_index_map(reference, _check_unique_ids(reference_info, "reference"))

        # intersections[g + 1, p + 1]: pixels of reference segment g and predicted segment p; row / column 0: void
        num_predicted = len(predicted_info)
        intersections = np.bincount(((reference_index + 1) * (num_predicted + 1) + predicted_index + 1).ravel(),
                                    minlength=(len(reference_info) + 1) * (num_predicted + 1))
        intersections = intersections.reshape(len(reference_info) + 1, num_predicted + 1).astype(np.float64)
        reference_areas, predicted_areas = intersections[1:].sum(1), intersections[:, 1:].sum(0)
        overlap, on_void = intersections[1:, 1:], intersections[0, 1:]
        union = reference_areas[:, None] + (predicted_areas - on_void)[None] - overlap
        iou = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)
        candidate = (reference_classes[:, None] == predicted_classes[None]) & ~crowd[:, None] & (predicted_areas > 0)[None]
        # IoU > 0.5 makes the match unique: no two segments of a non-overlapping map can both exceed it with one segment
        matched = candidate & (iou > 0.5)
        reference_matched, predicted_matched = matched.any(1), matched.any(0)

        iou_sum, true_positives, false_positives, false_negatives = (np.zeros(self.num_classes) for _ in range(4))
        np.add.at(iou_sum, reference_classes[reference_matched], iou[matched])
        np.add.at(true_positives, reference_classes[reference_matched], 1)
        np.add.at(false_negatives, reference_classes[~reference_matched & ~crowd], 1)
        same_class_crowd = (reference_classes[:, None] == predicted_classes[None]) & crowd[:, None]
        ignored_area = on_void + (overlap * same_class_crowd).sum(0)
        unmatched = ~predicted_matched & (predicted_areas > 0) & (ignored_area <= 0.5 * predicted_areas)
        np.add.at(false_positives, predicted_classes[unmatched], 1)
        self.counts += torch.from_numpy(np.stack([iou_sum, true_positives, false_positives, false_negatives]))

    def merge(self, other: "StreamingPanopticQuality") -> "StreamingPanopticQuality":
        if (other.num_classes, other.thing_class_ids) != (self.num_classes, self.thing_class_ids):
            raise ValueError("Only panoptic qualities of the same classes and thing classes can be merged.")
        self.counts += other.counts
        return self

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(PQ, SQ, RQ, occurs) per class, each (num_classes,); PQ/SQ/RQ are 0 where the class does not occur."""
        iou_sum, true_positives, false_positives, false_negatives = self.counts
        denominator = true_positives + 0.5 * false_positives + 0.5 * false_negatives
        segmentation_quality = torch.where(true_positives > 0, iou_sum / true_positives.clamp_min(1), 0.0)
        recognition_quality = torch.where(denominator > 0, true_positives / denominator.clamp_min(1e-12), 0.0)
        return segmentation_quality * recognition_quality, segmentation_quality, recognition_quality, denominator > 0

    def compute(self, class_names: Sequence[str] | None = None, unseen_class_names: Sequence[str] = ()) -> dict[str, float]:
        """
        PQ, SQ, RQ (percent) averaged over the classes that occur: all (`PQ`), thing (`PQ-things`) and stuff classes
        (`PQ-stuff`), and per class (`PQ-<name>`); with `unseen_class_names`, also over seen (`PQ-seen`) and unseen
        classes (`PQ-unseen`) and their harmonic means `hPQ`, `hSQ`, `hRQ`. A group with no occurring class is NaN.
        """
        names = checked_class_names(self.num_classes, class_names, unseen_class_names)
        *per_class_qualities, occurs = self.per_class()
        qualities = dict(zip(("PQ", "SQ", "RQ"), per_class_qualities))
        things = torch.zeros(self.num_classes, dtype=torch.bool)
        things[self.thing_class_ids] = True
        groups = {"": torch.ones_like(things), "-things": things, "-stuff": ~things}
        if unseen_class_names:
            unseen = torch.tensor([name in set(unseen_class_names) for name in names])
            groups.update({"-seen": ~unseen, "-unseen": unseen})
        results = {}
        for suffix, members in groups.items():
            selected = members & occurs
            for metric, values in qualities.items():
                results[f"{metric}{suffix}"] = 100 * values[selected].mean().item() if selected.any() else float("nan")
        if unseen_class_names:
            for metric in qualities:
                results[f"h{metric}"] = harmonic_mean(results[f"{metric}-seen"], results[f"{metric}-unseen"])
        for index, name in enumerate(names):
            results[f"PQ-{name}"] = 100 * qualities["PQ"][index].item() if occurs[index] else float("nan")
        return results


def _encode_masks(masks: np.ndarray) -> list[dict]:
    """(N, H, W) binary masks -> COCO run-length encodings."""
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))  # pycocotools takes (H, W, N)


def predicted_instance_masks(prediction: Mapping) -> tuple[np.ndarray, list[Mapping]]:
    """(N, H, W) boolean masks and their segments_info entries from Mask2Former's instance output: a map of segment
    ids (each segment its listed id's pixels) or, with `return_binary_maps`, (N, H, W) maps in segments_info order."""
    segmentation, segments_info = _as_numpy(prediction["segmentation"]), list(prediction["segments_info"])
    if segmentation.ndim == 3:
        if len(segmentation) != len(segments_info):
            raise ValueError(f"Got {len(segmentation)} binary maps for {len(segments_info)} segments.")
        return segmentation.astype(bool), segments_info
    if segmentation.ndim != 2:
        raise ValueError(f"A predicted segmentation must be (H, W) segment ids or (N, H, W) binary maps, got {segmentation.shape}.")
    ids = np.array(_check_unique_ids(segments_info, "predicted"), dtype=segmentation.dtype)
    return segmentation[None] == ids[:, None, None], segments_info


class StreamingMaskAP:
    """
    COCO mask average precision over the thing classes: the instances of every image (run-length encoded as they
    come, so memory stays small), evaluated at the end by pycocotools' `COCOeval` (segm, 100 detections per image).
    Reference instances are the thing segments of the panoptic ground truth, crowd ones marked `iscrowd` (a detection
    on them is neither a true nor a false positive); predicted instances of stuff classes are left out.
    """

    def __init__(self, num_classes: int, thing_class_ids: Collection[int]):
        self.num_classes = num_classes
        self.thing_class_ids = sorted({_check_class_index(index, num_classes, "Thing class") for index in thing_class_ids})
        if not self.thing_class_ids:
            raise ValueError("Mask AP needs at least one thing class.")
        self.images: list[dict] = []  # per image: {"height", "width", "references": [...], "detections": [...]}

    def update(self, prediction: Mapping, reference_segmentation, reference_segments_info: Sequence[Mapping]) -> None:
        """Adds one image: `prediction` as `post_process_instance_segmentation` returns it (segments with `label_id`
        and `score`), the reference as for `StreamingPanopticQuality.update`."""
        reference = _as_numpy(reference_segmentation).astype(np.int64)
        masks, segments_info = predicted_instance_masks(prediction)
        if masks.shape[1:] != reference.shape:
            raise ValueError(f"The predicted masks {masks.shape[1:]} and the reference {reference.shape} differ in size.")
        things = set(self.thing_class_ids)
        detections = [
            {"category_id": _check_class_index(segment["label_id"], self.num_classes, "Predicted label_id"), "score": float(segment["score"]), "mask": mask}
            for segment, mask in zip(segments_info, masks)
        ]
        detections = [detection for detection in detections if detection["category_id"] in things and detection["mask"].any()]
        _check_unique_ids(reference_segments_info, "reference")
        references = [segment for segment in reference_segments_info
                      if _check_class_index(segment["category_id"], self.num_classes, "Reference category_id") in things]
        reference_masks = np.stack([reference == int(segment["id"]) for segment in references]) if references else np.zeros((0, *reference.shape), bool)
        self.images.append({
            "height": reference.shape[0], "width": reference.shape[1],
            "references": [{"category_id": int(segment["category_id"]), "iscrowd": int(bool(segment.get("iscrowd", 0))), "rle": rle}
                           for segment, rle, mask in zip(references, _encode_masks(reference_masks), reference_masks) if mask.any()],
            "detections": [{"category_id": detection["category_id"], "score": detection["score"], "rle": rle}
                           for detection, rle in zip(detections, _encode_masks(np.stack([d["mask"] for d in detections])) if detections else [])],
        })

    def merge(self, other: "StreamingMaskAP") -> "StreamingMaskAP":
        if (other.num_classes, other.thing_class_ids) != (self.num_classes, self.thing_class_ids):
            raise ValueError("Only mask APs of the same classes and thing classes can be merged.")
        self.images += other.images
        return self

    def coco_evaluation(self):
        """pycocotools' `COCOeval` after `evaluate` and `accumulate`."""
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        images, annotations, detections = [], [], []
        for image_id, image in enumerate(self.images, start=1):
            images.append({"id": image_id, "height": image["height"], "width": image["width"]})
            for reference in image["references"]:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": reference["category_id"],
                                    "iscrowd": reference["iscrowd"], "segmentation": reference["rle"],
                                    "area": float(mask_utils.area(reference["rle"])), "bbox": mask_utils.toBbox(reference["rle"]).tolist()})
            detections += [{"image_id": image_id, "category_id": detection["category_id"], "score": detection["score"],
                            "segmentation": detection["rle"]} for detection in image["detections"]]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            ground_truth = COCO()
            ground_truth.dataset = {"images": images, "annotations": annotations,
                                    "categories": [{"id": index} for index in self.thing_class_ids]}
            ground_truth.createIndex()
            results = ground_truth.loadRes(detections) if detections else COCO()
            if not detections:
                results.dataset = {"images": images, "annotations": [], "categories": ground_truth.dataset["categories"]}
                results.createIndex()
            evaluation = COCOeval(ground_truth, results, iouType="segm")
            evaluation.params.imgIds = [image["id"] for image in images]
            evaluation.evaluate()
            evaluation.accumulate()
        return evaluation

    def compute(self, class_names: Sequence[str] | None = None, unseen_class_names: Sequence[str] = ()) -> dict[str, float]:
        """
        `AP` (IoU 0.5:0.95), `AP50`, `AP75` in percent over the thing classes that have reference instances, `AP-<name>`
        per thing class; with `unseen_class_names`, also `AP-seen`, `AP-unseen` and their harmonic mean `hAP`.
        """
        names = checked_class_names(self.num_classes, class_names, unseen_class_names)
        # precision: (IoU thresholds, recall points, classes, area ranges, max detections); -1 where a class has no reference
        precision = self.coco_evaluation().eval["precision"][:, :, :, 0, -1]

        def average(values: np.ndarray) -> float:
            values = values[values > -1]
            return 100 * float(values.mean()) if values.size else float("nan")

        results = {"AP": average(precision), "AP50": average(precision[0]), "AP75": average(precision[5])}
        per_class = {names[index]: average(precision[:, :, position]) for position, index in enumerate(self.thing_class_ids)}
        if unseen_class_names:
            unseen = set(unseen_class_names)
            seen_positions = [position for position, index in enumerate(self.thing_class_ids) if names[index] not in unseen]
            unseen_positions = [position for position, index in enumerate(self.thing_class_ids) if names[index] in unseen]
            results["AP-seen"], results["AP-unseen"] = average(precision[:, :, seen_positions]), average(precision[:, :, unseen_positions])
            results["hAP"] = harmonic_mean(results["AP-seen"], results["AP-unseen"])
        results.update({f"AP-{name}": value for name, value in per_class.items()})
        return results


__all__ = ["StreamingMaskAP", "StreamingPanopticQuality", "predicted_instance_masks"]

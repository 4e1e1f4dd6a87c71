"""Semantic-segmentation metrics with the evaluation protocol of DESIGN.md §5 (detectron2's semantic evaluator)."""

from collections.abc import Sequence

import numpy as np
import torch


def checked_class_names(num_classes: int, class_names: Sequence[str] | None, unseen_class_names: Sequence[str] = ()) -> list[str]:
    """The class names of a metric's `num_classes` classes ("0", "1", ... when not given), checked against the unseen ones."""
    names = list(class_names) if class_names is not None else [str(index) for index in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"Got {len(names)} class names for {num_classes} classes.")
    unknown = sorted(set(unseen_class_names) - set(names))
    if unknown:
        raise ValueError(f"Unseen class names not among the class names: {unknown}.")
    return names


def harmonic_mean(seen: float, unseen: float) -> float:
    """The harmonic mean of a seen-class and an unseen-class metric (0 when both are 0)."""
    return 2 * seen * unseen / (seen + unseen) if seen + unseen > 0 else 0.0


class StreamingConfusionMatrix:
    """
    A (ground truth x prediction) confusion matrix accumulated image by image; pixels whose ground truth is
    `ignore_index` are dropped. `compute` gives mIoU, fwIoU, mACC and pACC (in percent) and per-class IoU/accuracy.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be at least 1, got {num_classes}.")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predictions: torch.Tensor | np.ndarray, references: torch.Tensor | np.ndarray) -> None:
        """Add one image (H, W) or a batch (B, H, W) of predicted and ground-truth class indices."""
        predictions, references = torch.as_tensor(predictions), torch.as_tensor(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and references {tuple(references.shape)} differ in shape.")
        valid = references != self.ignore_index
        predictions, references = predictions[valid].long().cpu(), references[valid].long().cpu()
        for name, values in (("predictions", predictions), ("references", references)):
            if values.numel() and (values.min() < 0 or values.max() >= self.num_classes):
                raise ValueError(
                    f"{name} hold class indices outside [0, {self.num_classes - 1}] (ignore index {self.ignore_index}): "
                    f"found {values.min().item()}..{values.max().item()}."
                )
        counts = torch.bincount(references * self.num_classes + predictions, minlength=self.num_classes**2)
        self.matrix += counts.view(self.num_classes, self.num_classes)

    def merge(self, other: "StreamingConfusionMatrix") -> "StreamingConfusionMatrix":
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("Only confusion matrices of the same classes and ignore index can be merged.")
        self.matrix += other.matrix
        return self

    def compute(self, class_names: Sequence[str] | None = None, unseen_class_names: Sequence[str] = ()) -> dict[str, float]:
        """
        IoU_c = tp / (gt + pred - tp) over the classes with gt + pred > 0 (a class that is only predicted counts as
        0; one absent from both is left out); accuracy_c = tp / gt over classes with gt > 0; fwIoU weights IoU by the
        ground-truth share; pACC = sum(tp) / sum(gt). With `unseen_class_names`, also mIoU-seen, mIoU-unseen and their
        harmonic mean hIoU.
        """
        names = checked_class_names(self.num_classes, class_names, unseen_class_names)
        matrix = self.matrix.double()
        true_positives = matrix.diagonal()
        ground_truth, predicted = matrix.sum(dim=1), matrix.sum(dim=0)
        union = ground_truth + predicted - true_positives
        iou = torch.where(union > 0, true_positives / union.clamp_min(1), torch.nan)
        accuracy = torch.where(ground_truth > 0, true_positives / ground_truth.clamp_min(1), torch.nan)
        total = ground_truth.sum()
        present = union > 0
        results = {
            "mIoU": 100 * iou.nanmean().item(),
            "fwIoU": 100 * (iou[present] * ground_truth[present] / total).sum().item() if total > 0 else float("nan"),
            "mACC": 100 * accuracy.nanmean().item(),
            "pACC": 100 * (true_positives.sum() / total).item() if total > 0 else float("nan"),
        }
        for index, name in enumerate(names):
            results[f"IoU-{name}"] = 100 * iou[index].item()
            results[f"ACC-{name}"] = 100 * accuracy[index].item()
        if unseen_class_names:
            unseen = torch.tensor([name in set(unseen_class_names) for name in names])
            seen_miou = 100 * iou[~unseen].nanmean().item()
            unseen_miou = 100 * iou[unseen].nanmean().item()
            results["mIoU-seen"], results["mIoU-unseen"] = seen_miou, unseen_miou
            results["hIoU"] = harmonic_mean(seen_miou, unseen_miou)
        return results


HEADLINE_METRICS = (
    "mIoU", "fwIoU", "mACC", "pACC", "mIoU-seen", "mIoU-unseen", "hIoU",
    *(f"{metric}{group}" for group in ("", "-things", "-stuff", "-seen", "-unseen") for metric in ("PQ", "SQ", "RQ")),
    "hPQ", "hSQ", "hRQ", "AP", "AP50", "AP75", "AP-seen", "AP-unseen", "hAP",
)
PER_CLASS_METRICS = ("IoU", "PQ", "AP")


def format_results_table(results: dict[str, float]) -> str:
    """A markdown table of the headline metrics (semantic, panoptic or instance), then the per-class ones."""
    headline = [key for key in HEADLINE_METRICS if key in results]
    lines = ["| " + " | ".join(headline) + " |", "|" + "---|" * len(headline), "| " + " | ".join(f"{results[key]:.2f}" for key in headline) + " |", ""]
    for metric in PER_CLASS_METRICS:
        rows = [(key[len(metric) + 1 :], value) for key, value in results.items()
                if key.startswith(f"{metric}-") and key not in HEADLINE_METRICS]
        if rows:
            lines += [f"| class | {metric} |", "|---|---|"] + [f"| {name} | {value:.2f} |" for name, value in rows]
    return "\n".join(lines)


__all__ = ["StreamingConfusionMatrix", "checked_class_names", "format_results_table", "harmonic_mean"]

"""Class-agnostic masks from Segment Anything (transformers' `SamModel`), for MAFT to name: the automatic mask generation
of SAM (a grid of point prompts on one image embedding, masks kept by predicted IoU and stability, duplicates
suppressed), without torchvision, which transformers' `mask-generation` pipeline needs for its last step."""

import numpy as np
import torch
from tqdm.auto import tqdm


DEFAULT_SAM_MODEL = "facebook/sam-vit-base"


class SamMaskGenerator:
    """
    `SamMaskGenerator.from_pretrained("facebook/sam-vit-base")(image)` -> (K, H, W) boolean masks of the image, best
    predicted IoU first. SAM's automatic mask generation: `points_per_side`^2 point prompts in a grid over the image, three
    masks per point; masks whose predicted IoU is below `pred_iou_threshold` or whose stability (IoU of the mask at
    logit thresholds -1 and +1) is below `stability_score_threshold` are dropped, and of masks whose boxes overlap by
    more than `box_nms_threshold` (IoU) only the best is kept.
    """

    def __init__(self, model, processor, points_per_side: int = 32, points_per_batch: int = 64,
                 pred_iou_threshold: float = 0.88, stability_score_threshold: float = 0.95, box_nms_threshold: float = 0.7):
        self.model, self.processor = model.eval(), processor
        self.points_per_side, self.points_per_batch = points_per_side, points_per_batch
        self.pred_iou_threshold, self.stability_score_threshold = pred_iou_threshold, stability_score_threshold
        self.box_nms_threshold = box_nms_threshold

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_SAM_MODEL, device: str | torch.device | None = None, **kwargs) -> "SamMaskGenerator":
        from transformers import SamModel, SamProcessor

        return cls(SamModel.from_pretrained(name_or_path).to(device or "cpu"), SamProcessor.from_pretrained(name_or_path), **kwargs)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """An (H, W, 3) RGB image -> (K, H, W) boolean masks."""
        height, width = image.shape[:2]
        device = self.model.device
        inputs = self.processor(images=image, return_tensors="pt")
        image_embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(device))
        resized_height, resized_width = (int(value) for value in inputs["reshaped_input_sizes"][0])
        steps = (torch.arange(self.points_per_side, dtype=torch.float32) + 0.5) / self.points_per_side
        grid = torch.stack(torch.meshgrid(steps * resized_width, steps * resized_height, indexing="xy"), dim=-1).reshape(-1, 2)
        masks, scores = [], []
        for start in tqdm(range(0, len(grid), self.points_per_batch), desc="Segment Anything", unit="batch", leave=False):
            points = grid[start : start + self.points_per_batch].to(device)
            outputs = self.model(image_embeddings=image_embeddings, input_points=points[None, :, None],
                                 input_labels=torch.ones(1, len(points), 1, dtype=torch.long, device=device), multimask_output=True)
            (logits,) = self.processor.image_processor.post_process_masks(
                outputs.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
            )
            logits, iou_scores = logits.flatten(0, 1), outputs.iou_scores.cpu().flatten()
            kept = (iou_scores > self.pred_iou_threshold) & (stability_scores(logits) >= self.stability_score_threshold)
            masks.append(logits[kept] > 0)
            scores.append(iou_scores[kept])
        masks, scores = torch.cat(masks), torch.cat(scores)
        non_empty = masks.flatten(1).any(dim=1)
        masks, scores = masks[non_empty], scores[non_empty]
        return masks[box_nms(mask_boxes(masks), scores, self.box_nms_threshold)].numpy().reshape(-1, height, width)


def stability_scores(logits: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """(N, H, W) mask logits -> (N,) IoU between the masks thresholded at `+offset` and at `-offset`."""
    inner = (logits > offset).flatten(1).sum(dim=1)
    outer = (logits > -offset).flatten(1).sum(dim=1)
    return inner / outer.clamp(min=1)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) boolean masks -> (N, 4) boxes (x0, y0, x1, y1), exclusive ends; empty masks give empty boxes."""
    if len(masks) == 0:
        return torch.zeros(0, 4)
    rows, columns = masks.any(dim=2), masks.any(dim=1)

    def extent(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.arange(present.shape[1])
        first = torch.where(present, indices, present.shape[1]).min(dim=1).values
        last = torch.where(present, indices, -1).max(dim=1).values + 1
        return first, torch.maximum(last, first)

    top, bottom = extent(rows)
    left, right = extent(columns)
    return torch.stack([left, top, right, bottom], dim=1).float()


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first: a box is dropped when its IoU
    with a better kept box exceeds `threshold`."""
    order = scores.argsort(descending=True, stable=True)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = []
    for index in order.tolist():
        if kept:
            others = boxes[kept]
            width = (torch.minimum(others[:, 2], boxes[index, 2]) - torch.maximum(others[:, 0], boxes[index, 0])).clamp(min=0)
            height = (torch.minimum(others[:, 3], boxes[index, 3]) - torch.maximum(others[:, 1], boxes[index, 1])).clamp(min=0)
            overlap = width * height
            if (overlap / (areas[kept] + areas[index] - overlap).clamp(min=1e-9) > threshold).any():
                continue
        kept.append(index)
    return torch.tensor(kept, dtype=torch.long)

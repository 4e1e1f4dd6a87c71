"""
The losses of MAFT's two training stages (DESIGN.md §4), owned by the training code as transformers' Mask2Former owns
`Mask2FormerLoss`: the proposal generator's set-prediction loss with Hungarian matching (stage 1, the original's
`SetCriterion` without point sampling) and IP-CLIP's mask-aware and self-distillation losses (stage 2).
"""

import torch
from torch import nn
from torch.nn import functional as F


def sigmoid_focal_loss_per_pixel(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """The focal loss of every pixel (same shape as the inputs)."""
    probabilities = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * cross_entropy * (1 - p_t) ** gamma


def dice_loss_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - Dice of each (flattened) mask: (N, pixels) -> (N,)."""
    probabilities = logits.sigmoid()
    numerator = 2 * (probabilities * targets).sum(-1)
    return 1 - (numerator + 1) / (probabilities.sum(-1) + targets.sum(-1) + 1)


def semantic_targets(labels: torch.Tensor, ignore_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, the classes present (ascending) and one binary mask per class at the labels' (padded) size: padded
    and ignored pixels are negatives of every mask, as in the original."""
    targets = []
    for image_labels in labels:
        classes = image_labels.unique()
        classes = classes[classes != ignore_index]
        targets.append((classes, (image_labels[None] == classes[:, None, None]).float()))
    return targets


def panoptic_targets(labels: torch.Tensor, instance_labels: torch.Tensor, ignore_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, Mask2Former's panoptic targets: one binary mask per stuff class (the class's pixels outside every
    instance; classes ascending) and one per thing instance (`instance_labels` n > 0, instances ascending), with their
    classes; ignored pixels (void, crowd, padding) are negatives of every mask. Without instances, `semantic_targets`."""
    targets = []
    for image_labels, image_instances in zip(labels, instance_labels):
        stuff = image_labels[(image_instances == 0) & (image_labels != ignore_index)].unique()
        stuff_masks = (image_instances == 0)[None] & (image_labels[None] == stuff[:, None, None])
        instances = image_instances[(image_instances > 0) & (image_labels != ignore_index)].unique()
        instance_masks = image_instances[None] == instances[:, None, None]
        # an instance's class: that of its pixels (the first one's; the collator gives each instance one class)
        first_pixels = instance_masks.flatten(1).int().argmax(-1)
        instance_classes = image_labels.flatten()[first_pixels]
        targets.append((torch.cat([stuff, instance_classes]), torch.cat([stuff_masks, instance_masks]).float()))
    return targets


class MaftHungarianMatcher(nn.Module):
    """
    The one-to-one assignment of queries to the ground-truth masks of each image minimising
    `class_cost * (-p_class) + mask_cost * focal + dice_cost * dice`, compared at the prediction's resolution (ground
    truth resized with nearest), as the original's matcher.
    """

    def __init__(self, class_cost: float = 1.0, mask_cost: float = 20.0, dice_cost: float = 5.0):
        super().__init__()
        self.class_cost, self.mask_cost, self.dice_cost = class_cost, mask_cost, dice_cost

    @torch.no_grad()
    def forward(
        self, class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """class_logits (B, Q, C + 1), mask_logits (B, Q, h, w), targets from `semantic_targets` or
        `panoptic_targets` -> per image
        (query indices, target indices)."""
        from scipy.optimize import linear_sum_assignment  # training only: inference needs no scipy

        indices = []
        for image_class_logits, image_mask_logits, (classes, masks) in zip(class_logits, mask_logits, targets):
            predicted = image_mask_logits.flatten(1).float()
            target = F.interpolate(masks[:, None], size=image_mask_logits.shape[-2:], mode="nearest")[:, 0].flatten(1)
            class_cost = -image_class_logits.float().softmax(-1)[:, classes]
            positive = sigmoid_focal_loss_per_pixel(predicted, torch.ones_like(predicted))
            negative = sigmoid_focal_loss_per_pixel(predicted, torch.zeros_like(predicted))
            focal_cost = (positive @ target.T + negative @ (1 - target).T) / predicted.shape[1]
            probabilities = predicted.sigmoid()
            dice_cost = 1 - (2 * probabilities @ target.T + 1) / (probabilities.sum(-1)[:, None] + target.sum(-1)[None] + 1)
            cost = self.class_cost * class_cost + self.mask_cost * focal_cost + self.dice_cost * dice_cost
            query_indices, target_indices = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(query_indices, dtype=torch.long), torch.as_tensor(target_indices, dtype=torch.long)))
        return indices


class MaftProposalLoss(nn.Module):
    """
    Stage 1: the proposal generator's losses. Each supervised prediction is matched on its own; then cross-entropy
    over the in-vocabulary logits (no-object weighted `no_object_weight`), and sigmoid focal and dice losses of the
    matched mask logits upsampled (bilinear, `align_corners=False`) to the labels' padded size, normalised by the
    number of ground-truth masks in the batch (averaged over processes, as the original). The ground-truth masks are
    one per class present (`semantic_targets`), or with `instance_labels` one per thing instance and stuff class
    (`panoptic_targets`, Mask2Former's panoptic training).

    Deep supervision as the original: the final prediction and every auxiliary prediction but the last. (The original
    builds `DEC_LAYERS` decoder layers but makes its auxiliary list as Mask2Former does for `DEC_LAYERS - 1` of them,
    so the prediction of its second-to-last layer is not supervised; the golden stage-1 data shows it.)
    """

    def __init__(self, class_weight: float = 1.0, mask_weight: float = 20.0, dice_weight: float = 5.0,
                 no_object_weight: float = 0.1, ignore_index: int = 255):
        super().__init__()
        self.matcher = MaftHungarianMatcher(class_weight, mask_weight, dice_weight)
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.no_object_weight, self.ignore_index = no_object_weight, ignore_index

    def loss_labels(self, class_logits: torch.Tensor, targets, indices) -> torch.Tensor:
        num_classes = class_logits.shape[-1] - 1
        weights = torch.ones(num_classes + 1, device=class_logits.device)
        weights[-1] = self.no_object_weight
        target_classes = torch.full(class_logits.shape[:2], num_classes, dtype=torch.long, device=class_logits.device)
        for image_index, ((classes, _), (query_indices, target_indices)) in enumerate(zip(targets, indices)):
            target_classes[image_index, query_indices] = classes[target_indices]
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, weight=weights)

    def loss_masks(self, mask_logits: torch.Tensor, targets, indices, num_masks: float) -> tuple[torch.Tensor, torch.Tensor]:
        size = targets[0][1].shape[-2:]
        predicted = torch.cat([image_mask_logits[query_indices] for image_mask_logits, (query_indices, _) in zip(mask_logits, indices)])
        target = torch.cat([masks[target_indices] for (_, masks), (_, target_indices) in zip(targets, indices)])
        predicted = F.interpolate(predicted[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0].flatten(1)
        target = target.flatten(1)
        focal = sigmoid_focal_loss_per_pixel(predicted, target).mean(-1).sum() / num_masks
        dice = dice_loss_per_mask(predicted, target).sum() / num_masks
        return focal, dice

    def forward(
        self,
        class_queries_logits: torch.Tensor,
        masks_queries_logits: torch.Tensor,
        labels: torch.Tensor,
        auxiliary_predictions: list[dict[str, torch.Tensor]] | None = None,
        instance_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        class_queries_logits (B, Q, C + 1) and masks_queries_logits (B, Q, h, w) of the final prediction, labels
        (B, H, W) at the padded input size, `auxiliary_predictions` the earlier ones (dicts with the same two keys,
        earliest first), `instance_labels` (B, H, W) thing instance numbers for panoptic targets -> the weighted
        terms: `class_loss`, `mask_loss`, `dice_loss` of the final prediction and `class_loss_{i}`, ... of each
        supervised auxiliary prediction. The training loss is their sum.
        """
        num_classes = class_queries_logits.shape[-1] - 1
        if instance_labels is None:
            targets = semantic_targets(labels, self.ignore_index)
        else:
            targets = panoptic_targets(labels, instance_labels, self.ignore_index)
        for classes, _ in targets:
            if classes.numel() and (classes.min() < 0 or classes.max() >= num_classes):
                raise ValueError(
                    f"`labels` must hold class indices in [0, {num_classes - 1}] or {self.ignore_index} (ignore), "
                    f"got values {classes.tolist()}."
                )
        num_masks = torch.tensor(float(sum(len(classes) for classes, _ in targets)), device=labels.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            num_masks = num_masks / torch.distributed.get_world_size()
        num_masks = num_masks.clamp(min=1).item()

        supervised = [(class_queries_logits, masks_queries_logits, "")]
        supervised += [
            (prediction["class_queries_logits"], prediction["masks_queries_logits"], f"_{index}")
            for index, prediction in enumerate((auxiliary_predictions or [])[:-1])
        ]
        losses = {}
        for class_logits, mask_logits, suffix in supervised:
            indices = self.matcher(class_logits, mask_logits, targets)
            focal, dice = self.loss_masks(mask_logits, targets, indices, num_masks)
            losses[f"class_loss{suffix}"] = self.class_weight * self.loss_labels(class_logits, targets, indices)
            losses[f"mask_loss{suffix}"] = self.mask_weight * focal
            losses[f"dice_loss{suffix}"] = self.dice_weight * dice
        return losses


def mask_aware_loss(
    class_probabilities: torch.Tensor, proposal_masks: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """
    MAFT's mask-aware loss (DESIGN.md §4): for every class present in an image, the soft IoU of each proposal with
    that class's ground-truth mask, min-max normalised over the proposals, is the SmoothL1 target of the proposal's
    probability for the class. Averaged over all (class, proposal) pairs of the batch; zero when no pixel is labelled.

    class_probabilities: (B, Q, C); proposal_masks: (B, Q, H, W) probabilities; labels: (B, H, W) class indices or
    `ignore_index` (ignored pixels belong to no ground-truth mask, but still count in a proposal's area).
    """
    predictions, targets = [], []
    for probabilities, masks, image_labels in zip(class_probabilities, proposal_masks, labels):
        present = image_labels.unique()
        present = present[present != ignore_index]
        if present.numel() == 0:
            continue
        if present.min() < 0 or present.max() >= probabilities.shape[-1]:
            raise ValueError(
                f"`labels` must hold class indices in [0, {probabilities.shape[-1] - 1}] or {ignore_index} (ignore), "
                f"got values {present.tolist()}."
            )
        ground_truth = (image_labels.flatten()[None] == present[:, None]).to(masks.dtype)  # (K, H*W)
        flat_masks = masks.detach().flatten(1)  # (Q, H*W)
        intersection = ground_truth @ flat_masks.T  # (K, Q)
        union = ground_truth.sum(-1, keepdim=True) + flat_masks.sum(-1) - intersection
        iou = intersection / (union + 1e-7)
        iou_min, iou_max = iou.min(dim=-1, keepdim=True).values, iou.max(dim=-1, keepdim=True).values
        targets.append((iou - iou_min) / (iou_max - iou_min + 1e-8))
        predictions.append(probabilities[:, present].T)
    if not predictions:
        return class_probabilities.sum() * 0.0
    return F.smooth_l1_loss(torch.cat(predictions), torch.cat(targets))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """MAFT's self-distillation: SmoothL1 between the class distributions of the student and the frozen teacher."""
    return F.smooth_l1_loss(student_logits.softmax(dim=-1), teacher_logits.detach().softmax(dim=-1))


class MaftMaskAwareLoss(nn.Module):
    """
    Stage 2: IP-CLIP's mask-aware loss on the proposals' class probabilities and, given the class logits of IP-CLIP
    without masks (student) and of the frozen CLIP image tower (teacher), the self-distillation loss.
    """

    def __init__(self, mask_aware_weight: float = 1.0, distillation_weight: float = 0.1, ignore_index: int = 255):
        super().__init__()
        self.mask_aware_weight, self.distillation_weight, self.ignore_index = mask_aware_weight, distillation_weight, ignore_index

    def forward(
        self,
        clip_class_logits: torch.Tensor,
        proposal_masks: torch.Tensor,
        labels: torch.Tensor,
        student_class_logits: torch.Tensor | None = None,
        teacher_class_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        clip_class_logits (B, Q, C + 1): IP-CLIP's logits of the proposals (no-object last, unused); proposal_masks
        (B, Q, H, W) probabilities at the labels' padded size; labels (B, H, W); student/teacher logits (B, C) ->
        `mask_aware_loss` and, with both logits given, `distillation_loss`, each weighted.
        """
        if labels.shape[-2:] != proposal_masks.shape[-2:]:
            raise ValueError(f"`labels` {tuple(labels.shape)} must have the padded image size {tuple(proposal_masks.shape[-2:])}.")
        probabilities = clip_class_logits[..., :-1].softmax(dim=-1)
        losses = {"mask_aware_loss": self.mask_aware_weight * mask_aware_loss(probabilities, proposal_masks, labels, self.ignore_index)}
        if student_class_logits is not None and teacher_class_logits is not None:
            losses["distillation_loss"] = self.distillation_weight * distillation_loss(student_class_logits, teacher_class_logits)
        return losses


__all__ = [
    "MaftHungarianMatcher",
    "MaftMaskAwareLoss",
    "MaftProposalLoss",
    "dice_loss_per_mask",
    "distillation_loss",
    "mask_aware_loss",
    "panoptic_targets",
    "semantic_targets",
    "sigmoid_focal_loss_per_pixel",
]

"""
MAFT's two training stages, one declarative recipe each (DESIGN.md §4): which parameters train, the optimizer and its
parameter groups, learning rate, weight decay, steps, gradient clipping, schedule, batch, seed, augmentation and loss
weights. The Accelerate loop, the `transformers.Trainer` helper, the command line and the miniature reproduction all
read these objects; `recipe.replace(...)` changes values.
"""

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..loss_maft import MaftMaskAwareLoss, MaftProposalLoss
from ..modeling_maft import FrozenBatchNorm2d, MaftClipVisionModel, MaftModel, proposal_masks_from_logits
from .augmentation import AugmentationConfig


# The original's optimizer builder (detectron2 / Mask2Former): no weight decay for these module types, decay for
# every other trainable parameter, biases included.
NO_WEIGHT_DECAY_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm, nn.Embedding, FrozenBatchNorm2d,
)


@dataclass(frozen=True)
class TrainingRecipe:
    """
    Everything that defines how one stage trains. `trainable` holds regular expressions over `MaftModel` parameter
    names; every other parameter is frozen, and a top-level submodule with no trainable parameter is kept in eval
    mode (no dropout) while training.
    """

    stage: Literal["proposals", "maft"]
    description: str
    trainable: tuple[str, ...]
    learning_rate: float
    weight_decay: float
    max_steps: int
    backbone_lr_multiplier: float = 0.1
    gradient_clip_norm: float = 0.01
    poly_power: float = 0.9
    batch_size: int = 16
    seed: int = 123
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    loss_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        for name in ("learning_rate", "weight_decay", "gradient_clip_norm", "backbone_lr_multiplier"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must not be negative, got {getattr(self, name)}.")

    def replace(self, **values) -> "TrainingRecipe":
        """A copy with some values changed; unknown names are an error."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"A training recipe has no {', '.join(unknown)}; it has {', '.join(f.name for f in dataclasses.fields(self))}.")
        return dataclasses.replace(self, **values)

    def is_trainable(self, parameter_name: str) -> bool:
        return any(re.match(pattern, parameter_name) for pattern in self.trainable)

    def apply_to(self, model: MaftModel) -> list[str]:
        """Freezes every parameter but the recipe's; returns the names of the trainable ones."""
        trainable = []
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self.is_trainable(name))
            if parameter.requires_grad:
                trainable.append(name)
        if not trainable:
            raise ValueError(f"The {self.stage} recipe trains no parameter of this model.")
        return trainable

    def set_training_modes(self, model: MaftModel) -> None:
        """Training mode, except for the submodules that do not train (e.g. the proposal generator in stage 2)."""
        model.train()
        for module in model.children():
            if not any(parameter.requires_grad for parameter in module.parameters()):
                module.eval()

    def parameter_groups(self, model: MaftModel) -> list[dict]:
        """AdamW groups as the original's builder: weight decay by module type (none for normalization layers and
        `nn.Embedding`), the backbone's learning rate scaled by `backbone_lr_multiplier`."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        seen: set[int] = set()
        for module_name, module in model.named_modules():
            for parameter in module.parameters(recurse=False):
                if not parameter.requires_grad or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                key = (isinstance(module, NO_WEIGHT_DECAY_MODULES), module_name.startswith("backbone"))
                groups.setdefault(key, []).append(parameter)
        return [
            {
                "params": parameters,
                "weight_decay": 0.0 if no_decay else self.weight_decay,
                "lr": self.learning_rate * (self.backbone_lr_multiplier if in_backbone else 1.0),
            }
            for (no_decay, in_backbone), parameters in groups.items()
        ]

    def optimizer(self, model: MaftModel) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.parameter_groups(model))

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The poly schedule: lr * (1 - step / max_steps) ** poly_power."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / self.max_steps) ** self.poly_power)

    def training_loss(self, model: MaftModel, ignore_index: int = 255, teacher: MaftClipVisionModel | None = None) -> "StageLoss":
        """The stage's loss for `model` (before it is wrapped for distributed training). Stage 2 distils from
        `teacher`, by default a frozen copy of the model's IP-CLIP as training starts."""
        if self.stage == "proposals":
            return ProposalGeneratorLoss(self, MaftProposalLoss(**self.loss_weights, ignore_index=ignore_index))
        if teacher is None:
            teacher = copy.deepcopy(model.ip_clip)
        return MaskAwareFineTuningLoss(self, MaftMaskAwareLoss(**self.loss_weights, ignore_index=ignore_index), teacher)


PROPOSAL_GENERATOR_RECIPE = TrainingRecipe(
    stage="proposals",
    description="stage 1: the proposal generator trained with CLIP frozen",
    trainable=(r"backbone\.", r"pixel_decoder\.", r"context_interaction\.", r"decoder\.", r"no_object_embedding$"),
    learning_rate=1.5e-4,
    weight_decay=1.5e-4,
    max_steps=60000,
    loss_weights={"class_weight": 1.0, "mask_weight": 20.0, "dice_weight": 5.0, "no_object_weight": 0.1},
)

MASK_AWARE_FINE_TUNING_RECIPE = TrainingRecipe(
    stage="maft",
    description="stage 2: IP-CLIP fine-tuned with MAFT's mask-aware loss and self-distillation, the proposal generator frozen",
    # IP-CLIP's attention projections (q, k, v, out) and both layer norms of every layer, and the post layer norm
    trainable=(r"ip_clip\.encoder\.layers\.\d+\.(self_attn|layer_norm1|layer_norm2)\.", r"ip_clip\.post_layernorm\."),
    learning_rate=1e-5,
    weight_decay=1e-4,
    max_steps=1000,
    loss_weights={"mask_aware_weight": 1.0, "distillation_weight": 0.1},
)

RECIPES = {recipe.stage: recipe for recipe in (PROPOSAL_GENERATOR_RECIPE, MASK_AWARE_FINE_TUNING_RECIPE)}


def get_recipe(stage: str) -> TrainingRecipe:
    if stage not in RECIPES:
        raise ValueError(f"`stage` must be one of {', '.join(RECIPES)}, got {stage!r}.")
    return RECIPES[stage]


class StageLoss(nn.Module):
    """A stage's loss: `(model, batch, text_embeds) -> weighted terms`; the training loss is their sum. `model` may be
    wrapped for distributed training: it is called through its `forward`."""

    def __init__(self, recipe: TrainingRecipe, criterion: nn.Module):
        super().__init__()
        self.recipe, self.criterion = recipe, criterion

    @staticmethod
    def model_inputs(batch: dict, text_embeds: torch.Tensor) -> dict:
        inputs = {key: batch[key] for key in ("pixel_values", "clip_pixel_values", "pixel_mask", "image_sizes") if key in batch}
        return {**inputs, "text_embeds": text_embeds}


class ProposalGeneratorLoss(StageLoss):
    """Stage 1: the set-prediction loss of the final and the supervised auxiliary predictions, against panoptic targets
    when the batch has `instance_labels`."""

    def forward(self, model: nn.Module, batch: dict, text_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = model(**self.model_inputs(batch, text_embeds))
        return self.criterion(outputs.proposal_class_logits, outputs.masks_queries_logits, batch["labels"], outputs.auxiliary_logits,
                              batch.get("instance_labels"))


class MaskAwareFineTuningLoss(StageLoss):
    """Stage 2: the mask-aware loss of IP-CLIP's proposal classification and the self-distillation of IP-CLIP
    without masks (student) towards the frozen `teacher` image tower, both against the class text embeddings."""

    def __init__(self, recipe: TrainingRecipe, criterion: nn.Module, teacher: MaftClipVisionModel):
        super().__init__(recipe, criterion)
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "MaskAwareFineTuningLoss":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, model: nn.Module, batch: dict, text_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = model(**self.model_inputs(batch, text_embeds))
        unwrapped = extract_model_from_parallel(model)
        clip_pixel_values = batch["clip_pixel_values"]
        student = unwrapped.ip_clip(clip_pixel_values, interpolate_pos_encoding=True).image_embeds
        with torch.no_grad():
            teacher = self.teacher.to(clip_pixel_values.device)(clip_pixel_values, interpolate_pos_encoding=True).image_embeds
        return self.criterion(
            outputs.clip_class_logits,
            proposal_masks_from_logits(outputs.masks_queries_logits, batch["pixel_values"].shape[-2:]),
            batch["labels"],
            unwrapped.class_logits(student[:, None], outputs.text_embeds)[:, 0, :-1],
            unwrapped.class_logits(teacher[:, None], outputs.text_embeds)[:, 0, :-1],
        )


__all__ = [
    "MASK_AWARE_FINE_TUNING_RECIPE",
    "PROPOSAL_GENERATOR_RECIPE",
    "RECIPES",
    "TrainingRecipe",
    "get_recipe",
]

"""Fine-tuning with `transformers.Trainer`: the stage's recipe and loss in a `Trainer`, and `TrainingArguments` filled
from the recipe."""

from collections.abc import Sequence

import torch
from transformers import Trainer, TrainingArguments

from ..modeling_maft import MaftClipVisionModel, MaftModel
from ..processing_maft import MaftProcessor
from .recipes import MASK_AWARE_FINE_TUNING_RECIPE, TrainingRecipe


def trainer_arguments(output_dir: str, recipe: TrainingRecipe = MASK_AWARE_FINE_TUNING_RECIPE, **overrides) -> TrainingArguments:
    """`TrainingArguments` with the recipe's steps, learning rate, weight decay, gradient clipping, poly schedule,
    batch size and seed; `overrides` are any other `TrainingArguments` values."""
    values = dict(
        output_dir=output_dir,
        max_steps=recipe.max_steps,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.gradient_clip_norm,
        lr_scheduler_type="polynomial",
        lr_scheduler_kwargs={"power": recipe.poly_power, "lr_end": 0.0},
        warmup_steps=0,
        per_device_train_batch_size=recipe.batch_size,
        seed=recipe.seed,
        # the collator reads the image and label columns, which `forward` does not name
        remove_unused_columns=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


class MaftTrainer(Trainer):
    """
    A `transformers.Trainer` that trains a `MaftModel` with a stage's recipe: the recipe's trainable parameters, its
    optimizer groups (weight decay by module type, the backbone's learning rate scaled) with the `TrainingArguments`'
    learning rate and weight decay, and its loss against the text embeddings of `class_names`, computed once. Use
    `trainer_arguments` for the recipe's other values and `MaftTrainingCollator` as the data collator.
    """

    def __init__(self, model: MaftModel, args: TrainingArguments, *, processor: MaftProcessor, class_names: Sequence[str],
                 recipe: TrainingRecipe = MASK_AWARE_FINE_TUNING_RECIPE, teacher: MaftClipVisionModel | None = None, **kwargs):
        self.recipe = recipe.replace(learning_rate=args.learning_rate, weight_decay=args.weight_decay)
        self.recipe.apply_to(model)
        self.stage_loss = self.recipe.training_loss(model, processor.image_processor.ignore_index, teacher)
        self.class_tokens = processor.tokenize_class_names(list(class_names))
        self.text_embeds: torch.Tensor | None = None
        super().__init__(model=model, args=args, processing_class=processor, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = self.recipe.optimizer(self.model)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        if self.text_embeds is None or self.text_embeds.device != unwrapped.device:
            with torch.no_grad():
                tokens = {name: value.to(unwrapped.device) for name, value in self.class_tokens.items()}
                self.text_embeds = unwrapped.get_text_embeddings(**tokens)
        self.recipe.set_training_modes(unwrapped)
        losses = self.stage_loss(model, inputs, self.text_embeds)
        loss = sum(losses.values())
        return (loss, losses) if return_outputs else loss


__all__ = ["MaftTrainer", "trainer_arguments"]

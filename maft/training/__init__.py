"""Training MAFT: one recipe per stage, the Accelerate loop, and `transformers.Trainer` with the same recipe."""

from .collator import MaftTrainingCollator
from .loop import Evaluator, MaftTrainingArguments, best_checkpoint, complete_checkpoints, train, train_from_pretrained
from .publishing import FinalModelNotPublishedError
from .recipes import MASK_AWARE_FINE_TUNING_RECIPE, PROPOSAL_GENERATOR_RECIPE, RECIPES, TrainingRecipe, get_recipe
from .trainer import MaftTrainer, trainer_arguments


__all__ = [
    "MASK_AWARE_FINE_TUNING_RECIPE",
    "PROPOSAL_GENERATOR_RECIPE",
    "RECIPES",
    "Evaluator",
    "FinalModelNotPublishedError",
    "MaftTrainer",
    "MaftTrainingArguments",
    "MaftTrainingCollator",
    "TrainingRecipe",
    "best_checkpoint",
    "complete_checkpoints",
    "get_recipe",
    "train",
    "train_from_pretrained",
    "trainer_arguments",
]

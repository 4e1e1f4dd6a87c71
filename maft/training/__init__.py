"""Training MAFT: the Accelerate loop, the data collator shared with `transformers.Trainer`."""

from .collator import MaftTrainingCollator
from .loop import MaftTrainingArguments, complete_checkpoints, train


__all__ = ["MaftTrainingArguments", "MaftTrainingCollator", "complete_checkpoints", "train"]

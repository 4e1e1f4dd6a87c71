"""The Accelerate training loop of MAFT (DESIGN.md §4): checkpoints that survive interruption, exact resumption, and
checkpoints published to the Hub in the background."""

import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub import ModelCard
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..modeling_maft import MaftModel
from ..processing_maft import MaftProcessor
from .collator import EpochIndexedDataset, MaftTrainingCollator


logger = logging.getLogger("maft.training")

CHECKPOINT_PREFIX = "checkpoint-"
STAGE_DEFAULTS = {
    # stage: (learning rate, weight decay, steps), DESIGN.md §4
    "maft": (1e-5, 1e-4, 1000),
    "proposals": (1.5e-4, 1.5e-4, 60000),
}


@dataclass
class MaftTrainingArguments:
    """Every recipe value of DESIGN.md §4; `None` takes the stage's published value. `base_model` and `dataset_name`
    (what training started from and ran on) only go into the model cards of the checkpoints."""

    output_dir: str
    stage: str = "maft"
    max_steps: int | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    backbone_lr_multiplier: float = 0.1
    gradient_clip_norm: float = 0.01
    poly_power: float = 0.9
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 123
    save_steps: int = 100
    logging_steps: int = 10
    resume: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_upload_retries: int = 3
    trackers: list[str] = field(default_factory=list)
    base_model: str | None = None
    dataset_name: str | None = None

    def __post_init__(self):
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"`stage` must be one of {', '.join(STAGE_DEFAULTS)}, got {self.stage!r}.")
        learning_rate, weight_decay, steps = STAGE_DEFAULTS[self.stage]
        self.learning_rate = learning_rate if self.learning_rate is None else self.learning_rate
        self.weight_decay = weight_decay if self.weight_decay is None else self.weight_decay
        self.max_steps = steps if self.max_steps is None else self.max_steps
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (e.g. 'your-name/maft-coco').")
        for name in ("max_steps", "save_steps", "logging_steps", "per_device_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")


def optimizer_parameter_groups(model: MaftModel, arguments: MaftTrainingArguments) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and embeddings; the backbone's learning rate scaled down."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.dim() < 2 or "norm" in name or "embed" in name
        in_backbone = name.startswith("backbone.")
        groups.setdefault((no_decay, in_backbone), []).append(parameter)
    return [
        {
            "params": parameters,
            "weight_decay": 0.0 if no_decay else arguments.weight_decay,
            "lr": arguments.learning_rate * (arguments.backbone_lr_multiplier if in_backbone else 1.0),
        }
        for (no_decay, in_backbone), parameters in groups.items()
    ]


def poly_schedule(optimizer: torch.optim.Optimizer, max_steps: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / max_steps) ** power)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first. One being written is `checkpoint-N.partial` until it is complete."""
    directory = Path(output_dir)
    checkpoints = [path for path in directory.glob(f"{CHECKPOINT_PREFIX}*") if path.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(checkpoints, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


class HubPublisher:
    """Uploads folders to a Hub repo from a background thread, retrying failures; a failure is logged, never raised,
    so that training goes on and local checkpoints stay the source of truth."""

    def __init__(self, repo_id: str, retries: int):
        from huggingface_hub import HfApi

        self.api, self.repo_id, self.retries = HfApi(), repo_id, retries
        self.failures: list[str] = []
        self._thread: threading.Thread | None = None

    def publish(self, folder: Path, message: str) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._upload, args=(folder, message), daemon=True)
        self._thread.start()

    def _upload(self, folder: Path, message: str) -> None:
        for attempt in range(1, self.retries + 1):
            try:
                self.api.create_repo(self.repo_id, exist_ok=True)
                self.api.upload_folder(folder_path=folder, repo_id=self.repo_id, commit_message=message)
                return
            except Exception as error:  # any failure of the network or the Hub must not stop training
                logger.warning("maft: upload of %s to %s failed (attempt %d/%d): %s", folder, self.repo_id, attempt, self.retries, error)
                time.sleep(min(2**attempt, 10) * 0.1)
        self.failures.append(message)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()


def train(
    model: MaftModel,
    processor: MaftProcessor,
    train_dataset,
    collate_fn,
    arguments: MaftTrainingArguments,
) -> MaftModel:
    """
    Trains `model` for `arguments.stage` on `train_dataset` (a map-style dataset whose items `collate_fn` turns into
    `MaftModel` inputs with `labels`). Runs unchanged under `accelerate launch`. Checkpoints every `save_steps` with
    `Accelerator.save_state`; with `resume=True` continues from the newest complete checkpoint exactly (a
    `MaftTrainingCollator`'s augmentation included: it is seeded per example, from the epoch and the example's index).
    """
    output_dir = Path(arguments.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=arguments.gradient_accumulation_steps,
        mixed_precision=arguments.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=arguments.seed),
        log_with=arguments.trackers or None,
        project_dir=str(output_dir),
    )
    set_seed(arguments.seed)
    model.config.training_stage = arguments.stage
    if arguments.stage == "maft":
        model.apply_mask_aware_finetuning_recipe()
    else:
        model.apply_proposal_training_recipe()
    optimizer = torch.optim.AdamW(optimizer_parameter_groups(model, arguments))
    scheduler = poly_schedule(optimizer, arguments.max_steps, arguments.poly_power)
    if isinstance(collate_fn, MaftTrainingCollator):  # augmentation seeded per example, so resumption stays exact
        train_dataset = EpochIndexedDataset(train_dataset)
    loader = DataLoader(train_dataset, batch_size=arguments.per_device_batch_size, shuffle=True, collate_fn=collate_fn, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"The training set ({len(train_dataset)} items) is smaller than one batch ({arguments.per_device_batch_size}).")
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if arguments.trackers:
        accelerator.init_trackers("maft", config={key: value for key, value in asdict(arguments).items() if key != "trackers"})

    step = 0
    if arguments.resume and complete_checkpoints(output_dir):
        checkpoint = complete_checkpoints(output_dir)[-1]
        accelerator.load_state(str(checkpoint))
        step = int(checkpoint.name[len(CHECKPOINT_PREFIX) :])
        logger.info("maft: resumed from %s", checkpoint)
    publisher = HubPublisher(arguments.hub_model_id, arguments.hub_upload_retries) if arguments.push_to_hub else None
    batches_per_step = arguments.gradient_accumulation_steps
    progress = tqdm(total=arguments.max_steps, initial=step, desc="training", disable=not accelerator.is_main_process)
    model.train()
    while step < arguments.max_steps:
        epoch, batches_done = divmod(step * batches_per_step, len(loader))
        loader.set_epoch(epoch)
        if isinstance(train_dataset, EpochIndexedDataset):
            train_dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), arguments.gradient_clip_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            losses = {name: value.item() for name, value in outputs.loss_dict.items()}
            progress.set_postfix(loss=f"{outputs.loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % arguments.logging_steps == 0:
                accelerator.log({"loss": outputs.loss.item(), "learning_rate": scheduler.get_last_lr()[0], **losses}, step=step)
            if step % arguments.save_steps == 0 or step == arguments.max_steps:
                card = training_model_card(arguments, step, losses) if accelerator.is_main_process else None
                save_checkpoint(accelerator, model, processor, output_dir, step, publisher, card)
            if step >= arguments.max_steps:
                break
    progress.close()
    if publisher is not None:
        publisher.wait()
    accelerator.end_training()
    return accelerator.unwrap_model(model)


# what says where and how a run goes, not how it trains: left out of a checkpoint card's recipe table
CARD_OMITTED_ARGUMENTS = {"output_dir", "resume", "push_to_hub", "hub_model_id", "hub_upload_retries", "trackers", "base_model", "dataset_name"}
STAGE_DESCRIPTIONS = {
    "proposals": "stage 1: the proposal generator trained with CLIP frozen",
    "maft": "stage 2: IP-CLIP fine-tuned with MAFT's mask-aware loss and self-distillation, the proposal generator frozen",
}


def training_model_card(arguments: MaftTrainingArguments, step: int, losses: dict[str, float]) -> ModelCard:
    """The card of a checkpoint: what was trained from what on which data, the recipe, and the losses at `step`."""
    from ..model_card import maft_model_card

    name = arguments.hub_model_id or Path(arguments.output_dir).name
    recipe = {key: value for key, value in asdict(arguments).items() if key not in CARD_OMITTED_ARGUMENTS}
    text = "\n".join([
        f"MAFT ({STAGE_DESCRIPTIONS[arguments.stage]}), trained with `maft train`: step {step} of {arguments.max_steps}, "
        f"from `{arguments.base_model or 'unknown'}` on `{arguments.dataset_name or 'unknown'}`.",
        "",
        "## Recipe",
        "",
        "| option | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in recipe.items()),
        "",
        f"## Training losses at step {step}",
        "",
        "| loss | value |",
        "|---|---|",
        *(f"| {key} | {value:.4f} |" for key, value in losses.items()),
    ])
    # the Hub links a base model by its id: a local folder is named in the text only
    metadata = {"base_model": arguments.base_model} if arguments.base_model and not Path(arguments.base_model).exists() else {}
    if arguments.dataset_name:
        metadata["datasets"] = [arguments.dataset_name]
    return maft_model_card(name, text, **metadata)


def save_checkpoint(accelerator: Accelerator, model, processor, output_dir: Path, step: int, publisher: HubPublisher | None,
                    card: ModelCard | None = None) -> None:
    """`checkpoint-{step}`: the training state (to resume) and a `save_pretrained` model and processor with `card` as
    README.md (to use or publish). Written as `.partial` and renamed when complete, so an interrupted write never looks complete."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f"{CHECKPOINT_PREFIX}{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(partial / "model")
        processor.save_pretrained(partial / "model")
        if card is not None:
            card.save(partial / "model" / "README.md")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if publisher is not None:
            publisher.publish(final / "model", f"Training step {step}")
    accelerator.wait_for_everyone()


__all__ = ["MaftTrainingArguments", "complete_checkpoints", "optimizer_parameter_groups", "poly_schedule", "train"]

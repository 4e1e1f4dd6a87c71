"""The Accelerate training loop of MAFT (DESIGN.md §4): checkpoints that survive interruption, exact resumption, and
checkpoints published to the Hub in the background."""

import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub import ModelCard
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..modeling_maft import MaftClipVisionModel, MaftModel
from ..processing_maft import MaftProcessor
from .collator import EpochIndexedDataset, MaftTrainingCollator
from .recipes import MASK_AWARE_FINE_TUNING_RECIPE, TrainingRecipe


logger = logging.getLogger("maft.training")

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class MaftTrainingArguments:
    """How a run goes (where it writes, how often it saves and logs, where it publishes); how it trains is the
    `recipe`'s (`maft.training.recipes`). `base_model` and `dataset_name` (what training started from and ran on) only
    go into the model cards of the checkpoints."""

    output_dir: str
    recipe: TrainingRecipe = MASK_AWARE_FINE_TUNING_RECIPE
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
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
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (e.g. 'your-name/maft-coco').")
        for name in ("save_steps", "logging_steps", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")


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
    class_names: Sequence[str],
    arguments: MaftTrainingArguments,
    teacher: MaftClipVisionModel | None = None,
) -> MaftModel:
    """
    Trains `model` with `arguments.recipe` on `train_dataset` (a map-style dataset whose items `collate_fn` turns into
    `MaftModel` inputs with `labels`, class indices into `class_names`). Stage 2 distils from `teacher`, by default
    a frozen copy of the model's IP-CLIP as given. Runs unchanged under `accelerate launch`. Checkpoints every
    `save_steps` with `Accelerator.save_state`; with `resume=True` continues from the newest complete checkpoint
    exactly (a `MaftTrainingCollator`'s augmentation included: it is seeded per example, from the epoch and the
    example's index).
    """
    recipe, output_dir = arguments.recipe, Path(arguments.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=arguments.gradient_accumulation_steps,
        mixed_precision=arguments.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
        log_with=arguments.trackers or None,
        project_dir=str(output_dir),
    )
    set_seed(recipe.seed)
    recipe.apply_to(model)
    stage_loss = recipe.training_loss(model, processor.image_processor.ignore_index, teacher)
    class_tokens = processor.tokenize_class_names(list(class_names))
    optimizer = recipe.optimizer(model)
    scheduler = recipe.lr_scheduler(optimizer)
    if isinstance(collate_fn, MaftTrainingCollator):  # augmentation seeded per example, so resumption stays exact
        train_dataset = EpochIndexedDataset(train_dataset)
    loader = DataLoader(train_dataset, batch_size=recipe.batch_size, shuffle=True, collate_fn=collate_fn, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"The training set ({len(train_dataset)} items) is smaller than one batch ({recipe.batch_size}).")
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    with torch.no_grad():  # the text encoder is frozen in both stages: the vocabulary is encoded once
        text_embeds = accelerator.unwrap_model(model).get_text_embeddings(
            **{name: tokens.to(accelerator.device) for name, tokens in class_tokens.items()}
        )
    if arguments.trackers:
        accelerator.init_trackers("maft", config={"stage": recipe.stage, **training_settings(arguments)})

    step = 0
    if arguments.resume and complete_checkpoints(output_dir):
        checkpoint = complete_checkpoints(output_dir)[-1]
        accelerator.load_state(str(checkpoint))
        step = int(checkpoint.name[len(CHECKPOINT_PREFIX) :])
        logger.info("maft: resumed from %s", checkpoint)
    publisher = HubPublisher(arguments.hub_model_id, arguments.hub_upload_retries) if arguments.push_to_hub else None
    batches_per_step = arguments.gradient_accumulation_steps
    progress = tqdm(total=recipe.max_steps, initial=step, desc="training", disable=not accelerator.is_main_process)
    recipe.set_training_modes(accelerator.unwrap_model(model))
    while step < recipe.max_steps:
        epoch, batches_done = divmod(step * batches_per_step, len(loader))
        loader.set_epoch(epoch)
        if isinstance(train_dataset, EpochIndexedDataset):
            train_dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                losses = stage_loss(model, batch, text_embeds)
                loss = sum(losses.values())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.gradient_clip_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            losses = {name: value.item() for name, value in losses.items()}
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % arguments.logging_steps == 0:
                accelerator.log({"loss": loss.item(), "learning_rate": scheduler.get_last_lr()[0], **losses}, step=step)
            if step % arguments.save_steps == 0 or step == recipe.max_steps:
                card = training_model_card(arguments, step, losses) if accelerator.is_main_process else None
                save_checkpoint(accelerator, model, processor, output_dir, step, publisher, card)
            if step >= recipe.max_steps:
                break
    progress.close()
    if publisher is not None:
        publisher.wait()
    accelerator.end_training()
    return accelerator.unwrap_model(model)


def train_from_pretrained(
    init_from: str,
    train_dataset,
    class_names: Sequence[str],
    arguments: MaftTrainingArguments,
    label_ignore_index: int | None = None,
    augment: bool = True,
) -> MaftModel:
    """
    `train` of the model and processor saved at `init_from` (a folder or Hub id) on `train_dataset` (columns image
    and label), with the recipe's augmentation unless `augment` is False; the trained model and its processor are
    saved to `arguments.output_dir` (by the main process only, under `accelerate launch`). `label_ignore_index` is the
    dataset's label of unlabelled pixels when it is not the processor's.
    """
    model, processor = MaftModel.from_pretrained(init_from), MaftProcessor.from_pretrained(init_from)
    collator = MaftTrainingCollator(processor, augmentation=arguments.recipe.augmentation if augment else None,
                                    seed=arguments.recipe.seed, label_ignore_index=label_ignore_index)
    trained = train(model, processor, train_dataset, collator, class_names, arguments)
    if PartialState().is_main_process:
        trained.save_pretrained(arguments.output_dir)
        processor.save_pretrained(arguments.output_dir)
    return trained


def training_settings(arguments: MaftTrainingArguments) -> dict:
    """The recipe's values and the run's batch settings, as a checkpoint's card and the trackers record them."""
    recipe = {key: value for key, value in asdict(arguments.recipe).items() if key not in ("stage", "description", "trainable")}
    return {**recipe, "gradient_accumulation_steps": arguments.gradient_accumulation_steps,
            "mixed_precision": arguments.mixed_precision}


def training_model_card(arguments: MaftTrainingArguments, step: int, losses: dict[str, float]) -> ModelCard:
    """The card of a checkpoint: what was trained from what on which data, the recipe, and the losses at `step`."""
    from ..model_card import maft_model_card

    name = arguments.hub_model_id or Path(arguments.output_dir).name
    recipe = training_settings(arguments)
    text = "\n".join([
        f"MAFT ({arguments.recipe.description}), trained with `maft train`: step {step} of {arguments.recipe.max_steps}, "
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


__all__ = ["MaftTrainingArguments", "complete_checkpoints", "train", "train_from_pretrained"]

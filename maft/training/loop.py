"""The Accelerate training loop of MAFT (DESIGN.md §4): exact resumption, checkpoints that survive interruption
(signals, a crash, a full disk, another process being slow), and checkpoints published to the Hub in the background."""

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.tracking import GeneralTracker
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..modeling_maft import MaftClipVisionModel, MaftModel
from ..processing_maft import MaftProcessor
from ..utils.output_files import write_json
from .checkpoints import EVALUATION_NAME, CheckpointStore, best_checkpoint, complete_checkpoints
from .collator import EpochIndexedDataset, MaftTrainingCollator
from .publishing import FinalModelNotPublishedError, HubPublisher
from .recipes import MASK_AWARE_FINE_TUNING_RECIPE, TrainingRecipe


logger = logging.getLogger("maft.training")
# model, processor, device -> metrics; called by every process (`maft.evaluation.EvaluationSet` shards its dataset)
Evaluator = Callable[[MaftModel, MaftProcessor, torch.device], dict[str, float]]
# the metrics that go to the console and the trackers at each evaluation (not the per-class ones)
HEADLINE_METRICS = ("mIoU", "fwIoU", "mACC", "pACC", "mIoU-seen", "mIoU-unseen", "hIoU")


@dataclass
class MaftTrainingArguments:
    """How a run goes (where it writes, how often it saves and logs, where it publishes); how it trains is the
    `recipe`'s (`maft.training.recipes`). `save_total_limit` checkpoints are kept, the newest (None: all), and
    with an evaluator the best evaluated one too; with `push_to_hub`, an older one also while it is being uploaded,
    until the upload ends (published, given up or replaced by a newer checkpoint): the next checkpoint or the end of
    training deletes it. With an evaluator (`train(..., evaluator=...)`), the model is evaluated every `eval_steps`
    (default: `save_steps`; a multiple of it, so that each evaluation is a checkpoint's) and at the last step.
    `hub_timeout` bounds every Hub request, in seconds; at the end of training the last upload is waited for at most
    `hub_timeout * hub_upload_retries` seconds. Every `logging_steps`, the losses, learning rate and samples per
    second go to the console and to `trackers` (Accelerate's: names such as "tensorboard", or tracker objects). `base_model` and `dataset_name` (what training started from and ran
    on) only go into the model cards of the checkpoints."""

    output_dir: str
    recipe: TrainingRecipe = MASK_AWARE_FINE_TUNING_RECIPE
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    save_steps: int = 100
    save_total_limit: int | None = 3
    eval_steps: int | None = None
    logging_steps: int = 10
    resume: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_upload_retries: int = 3
    hub_timeout: float = 60.0
    trackers: list[str | GeneralTracker] = field(default_factory=list)
    base_model: str | None = None
    dataset_name: str | None = None

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (e.g. 'your-name/maft-coco').")
        if self.push_to_hub:
            try:
                validate_repo_id(self.hub_model_id)
            except ValueError as error:
                raise ValueError(f"`hub_model_id` {self.hub_model_id!r} is not a Hub repo id ('name' or 'namespace/name'"
                                 f" of letters, digits, '-', '_', '.'): {error}") from error
        for name in ("save_steps", "logging_steps", "gradient_accumulation_steps", "hub_upload_retries"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"`save_total_limit` must be at least 1 (or None to keep every checkpoint), got {self.save_total_limit}.")
        if self.eval_steps is not None and (self.eval_steps < 1 or self.eval_steps % self.save_steps):
            raise ValueError(f"`eval_steps` must be a positive multiple of `save_steps` ({self.save_steps}), so that every "
                             f"evaluation is recorded in a checkpoint; got {self.eval_steps}.")
        if self.hub_timeout <= 0:
            raise ValueError(f"`hub_timeout` must be positive (seconds), got {self.hub_timeout}.")


def announce(message: str) -> None:
    """A line for the person running training, on the main process, visible without any logging set up."""
    if PartialState().is_main_process:
        tqdm.write(message, file=sys.stderr)


class StopOnSignal:
    """
    While training, SIGINT and SIGTERM ask the loop to stop after the current step: it writes a checkpoint and
    `train` exits with 128 + the signal number (130, 143). A second signal stops at once (KeyboardInterrupt).
    Handlers are installed only from the main thread (Python delivers signals there).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = number

    def requested(self, accelerator: Accelerator) -> int | None:
        """The signal received by any process (all stop together: saving a checkpoint takes every process)."""
        if accelerator.num_processes == 1:
            return self.received
        received = accelerator.reduce(torch.tensor([self.received or 0], device=accelerator.device), reduction="max")
        return int(received.item()) or None


def train(
    model: MaftModel,
    processor: MaftProcessor,
    train_dataset,
    collate_fn,
    class_names: Sequence[str],
    arguments: MaftTrainingArguments,
    teacher: MaftClipVisionModel | None = None,
    evaluator: Evaluator | None = None,
) -> MaftModel:
    """
    Trains `model` with `arguments.recipe` on `train_dataset` (a map-style dataset whose items `collate_fn` turns into
    `MaftModel` inputs with `labels`, class indices into `class_names`). Stage 2 distils from `teacher`, by default
    a frozen copy of the model's IP-CLIP as given. Runs unchanged under `accelerate launch`.

    Checkpoints every `save_steps` (`CheckpointStore`); with `resume=True` continues exactly from the newest sound
    checkpoint (a `MaftTrainingCollator`'s augmentation included: it is seeded per example, from the epoch and the
    example's index), skipping damaged ones with a warning. SIGINT / SIGTERM finish the step, write a checkpoint and
    raise `SystemExit(130 / 143)`. With `push_to_hub`, Hub access is checked before step 1 (PermissionError or
    ConnectionError) and checkpoints are uploaded in the background (`HubPublisher`); when the last checkpoint did
    not reach the Hub, `FinalModelNotPublishedError` is raised once everything is saved (its `upload_command`
    publishes it later). Labels outside `class_names` raise a ValueError naming the example, before it is trained on.

    With an `evaluator` (e.g. `maft.evaluation.EvaluationSet`), every process evaluates the model every
    `eval_steps` and at the end: the metrics go to the console, the trackers (`eval_` prefix) and the checkpoint
    (`eval_results.json`); the checkpoint limit keeps the best one by hIoU, or mIoU without unseen classes; the last
    evaluation is written to `output_dir/eval_results.json`.
    """
    recipe, output_dir = arguments.recipe, Path(arguments.output_dir)
    if len(train_dataset) == 0:
        raise ValueError("The training set is empty: give a dataset with at least one example (image and label).")
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
        collate_fn = collate_fn.checking_labels(len(class_names))
    # The loader's own generator: creating an iterator draws a seed from it, which would otherwise advance the global
    # RNG that dropout uses, once more on resume (in `skip_first_batches`) than in a run without interruption.
    loader = DataLoader(train_dataset, batch_size=recipe.batch_size, shuffle=True, collate_fn=collate_fn, drop_last=True,
                        generator=torch.Generator().manual_seed(recipe.seed))
    if len(loader) == 0:
        raise ValueError(f"The training set ({len(train_dataset)} items) is smaller than one batch ({recipe.batch_size}).")
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    with torch.no_grad():  # the text encoder is frozen in both stages: the vocabulary is encoded once
        text_embeds = accelerator.unwrap_model(model).get_text_embeddings(
            **{name: tokens.to(accelerator.device) for name, tokens in class_tokens.items()}
        )
    if arguments.trackers:
        accelerator.init_trackers("maft", config={"stage": recipe.stage, **training_settings(arguments)})

    publisher = open_publisher(accelerator, arguments) if arguments.push_to_hub else None
    store = CheckpointStore(accelerator, output_dir, arguments.save_total_limit)
    step = resume_step(store, model) if arguments.resume else 0
    batches_per_step = arguments.gradient_accumulation_steps
    eval_steps = arguments.eval_steps or arguments.save_steps
    samples_per_step = recipe.batch_size * batches_per_step * accelerator.num_processes
    progress = tqdm(total=recipe.max_steps, initial=step, desc="training", disable=not accelerator.is_main_process)
    recipe.set_training_modes(accelerator.unwrap_model(model))
    last_log = (step, time.perf_counter())
    with StopOnSignal() as stop:
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
                learning_rate = scheduler.get_last_lr()[0]
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{learning_rate:.2e}")
                if step % arguments.logging_steps == 0:
                    elapsed = time.perf_counter() - last_log[1]
                    record = {"loss": loss.item(), **losses, "learning_rate": learning_rate,
                              "samples_per_second": (step - last_log[0]) * samples_per_step / max(elapsed, 1e-9)}
                    accelerator.log(record, step=step)
                    if accelerator.is_main_process:
                        progress.write(f"step {step}/{recipe.max_steps}: " + ", ".join(
                            f"{name} {value:.3g}" if name != "learning_rate" else f"{name} {value:.2e}" for name, value in record.items()))
                    last_log = (step, time.perf_counter())
                signal_number = stop.requested(accelerator)
                evaluation = None
                if evaluator is not None and not signal_number and (step % eval_steps == 0 or step == recipe.max_steps):
                    evaluation = evaluate_during_training(accelerator, model, processor, evaluator, recipe, step)
                if step % arguments.save_steps == 0 or step == recipe.max_steps or signal_number:
                    card = training_model_card(arguments, step, losses) if accelerator.is_main_process else None
                    checkpoint = save_checkpoint(store, model, processor, step, card, publisher, evaluation)
                if signal_number:
                    progress.close()
                    stop_after_signal(signal_number, step, checkpoint, store, publisher, arguments)
                if step >= recipe.max_steps:
                    break
    progress.close()
    publishing_failure = finish_publishing(store, publisher, arguments)
    if evaluator is not None and accelerator.is_main_process:
        report_evaluations(output_dir)
    accelerator.end_training()
    if publishing_failure is not None:
        raise publishing_failure
    return accelerator.unwrap_model(model)


def evaluate_during_training(accelerator: Accelerator, model, processor: MaftProcessor, evaluator: Evaluator,
                             recipe: TrainingRecipe, step: int) -> dict[str, float]:
    """The evaluator's metrics of the model at `step`, shown and logged; the model goes back to its training modes."""
    unwrapped = accelerator.unwrap_model(model)
    results = evaluator(unwrapped, processor, accelerator.device)
    recipe.set_training_modes(unwrapped)
    headline = {name: results[name] for name in HEADLINE_METRICS if name in results}
    accelerator.log({f"eval_{name}": value for name, value in headline.items()}, step=step)
    announce(f"maft: evaluation at step {step}: " + ", ".join(f"{name} {value:.2f}" for name, value in headline.items()))
    return results


def report_evaluations(output_dir: Path) -> None:
    """Copies the last checkpoint's evaluation to `output_dir/eval_results.json` and names the best checkpoint (a run
    resumed after its last step, from checkpoints written without evaluation, has neither)."""
    last = complete_checkpoints(output_dir)[-1] / EVALUATION_NAME
    if last.is_file():
        write_json(output_dir / EVALUATION_NAME, json.loads(last.read_text()))
    best = best_checkpoint(output_dir)
    if best is not None:
        checkpoint, metric, value = best
        announce(f"maft: best checkpoint by {metric}: {checkpoint.name} ({metric} {value:.2f})")


def resume_step(store: CheckpointStore, model) -> int:
    """Loads the newest sound checkpoint, saying which ones were skipped and why; the step to go on from."""
    checkpoint, problems = store.newest_sound()
    for problem in problems:
        announce(f"maft: WARNING: skipping a damaged checkpoint: {problem}")
    if checkpoint is None:
        announce(f"maft: WARNING: resume requested but {store.output_dir} has no sound checkpoint: starting from step 0")
        return 0
    step = store.load(model, checkpoint)
    announce(f"maft: resumed from {checkpoint.name} at step {step}")
    return step


def open_publisher(accelerator: Accelerator, arguments: MaftTrainingArguments) -> HubPublisher | None:
    """The main process's publisher, once the Hub repo is known to be writable; every process raises if it is not."""
    publisher, failure = None, [None]
    if accelerator.is_main_process:
        publisher = HubPublisher(arguments.hub_model_id, arguments.hub_upload_retries, arguments.hub_timeout)
        try:
            publisher.check_access()
        except (PermissionError, ConnectionError) as error:
            failure = [error]
    if accelerator.num_processes > 1:
        broadcast_object_list(failure)
    if failure[0] is not None:
        raise failure[0]
    return publisher


def save_checkpoint(store: CheckpointStore, model, processor: MaftProcessor, step: int, card: ModelCard | None,
                    publisher: HubPublisher | None, evaluation: dict[str, float] | None = None) -> Path:
    """Writes the checkpoint of `step` (with the model's evaluation, if any) and queues it for the Hub."""
    protected = publisher.folders_in_use() if publisher is not None else set()
    checkpoint = store.save(model, processor, step, card, protected, evaluation)
    if publisher is not None:
        publisher.publish(step, checkpoint / "model")
    return checkpoint


def finish_publishing(store: CheckpointStore, publisher: HubPublisher | None,
                      arguments: MaftTrainingArguments) -> FinalModelNotPublishedError | None:
    """Waits for the last upload, says what was published and what not, and deletes the checkpoints beyond the limit
    that were kept only while they were being uploaded (one still uploading stays). Returns the error to raise when
    the newest checkpoint did not reach the Hub."""
    if publisher is None:
        return None
    announce(publisher.finish(wait=arguments.hub_timeout * arguments.hub_upload_retries))
    store.prune(publisher.folders_in_use())
    return publisher.final_model_error()


def stop_after_signal(signal_number: int, step: int, checkpoint: Path, store: CheckpointStore,
                      publisher: HubPublisher | None, arguments: MaftTrainingArguments) -> None:
    finish_publishing(store, publisher, arguments)
    name = signal.Signals(signal_number).name
    announce(f"maft: stopped by {name} after step {step}; the training state is in {checkpoint}. "
             f"To go on, run the same command with --resume (train(..., resume=True)) and output dir {arguments.output_dir}.")
    raise SystemExit(128 + signal_number)


def train_from_pretrained(
    init_from: str,
    train_dataset,
    class_names: Sequence[str],
    arguments: MaftTrainingArguments,
    label_ignore_index: int | None = None,
    augment: bool = True,
    evaluator: Evaluator | None = None,
    panoptic_targets: bool = False,
) -> MaftModel:
    """
    `train` of the model and processor saved at `init_from` (a folder or Hub id) on `train_dataset` (columns image
    and label), with the recipe's augmentation unless `augment` is False; the trained model and its processor are
    saved to `arguments.output_dir` (by the main process only, under `accelerate launch`). `label_ignore_index` is the
    dataset's label of unlabelled pixels when it is not the processor's. `evaluator`: see `train`; its
    `FinalModelNotPublishedError` is raised after the model is saved. With `panoptic_targets`, the dataset's
    COCO-panoptic annotations (columns panoptic and segments_info, thing classes in its metadata) are the labels:
    stage 1 learns one mask per thing instance and per stuff class, crowd ignored.
    """
    from ..data.segmentation_data import panoptic_thing_class_ids

    thing_class_ids = panoptic_thing_class_ids(train_dataset) if panoptic_targets else None
    model, processor = MaftModel.from_pretrained(init_from), MaftProcessor.from_pretrained(init_from)
    collator = MaftTrainingCollator(processor, augmentation=arguments.recipe.augmentation if augment else None,
                                    seed=arguments.recipe.seed, label_ignore_index=label_ignore_index,
                                    thing_class_ids=thing_class_ids)
    publishing_failure = None
    try:
        train(model, processor, train_dataset, collator, class_names, arguments, evaluator=evaluator)  # trains `model` in place
    except FinalModelNotPublishedError as error:
        publishing_failure = error
    if PartialState().is_main_process:
        model.save_pretrained(arguments.output_dir)
        processor.save_pretrained(arguments.output_dir)
    if publishing_failure is not None:
        raise publishing_failure
    return model


def training_settings(arguments: MaftTrainingArguments) -> dict:
    """The recipe's values and the run's batch settings, as a checkpoint's card and the trackers record them."""
    recipe = {key: value for key, value in asdict(arguments.recipe).items() if key not in ("stage", "description", "trainable")}
    return {**recipe, "gradient_accumulation_steps": arguments.gradient_accumulation_steps,
            "mixed_precision": arguments.mixed_precision}


def training_model_card(arguments: MaftTrainingArguments, step: int, losses: dict[str, float]) -> ModelCard:
    """The card of a checkpoint: what was trained from what on which data, the recipe, and the losses at `step`."""
    from ..utils.model_card import maft_model_card

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


__all__ = ["Evaluator", "MaftTrainingArguments", "best_checkpoint", "complete_checkpoints", "train", "train_from_pretrained"]

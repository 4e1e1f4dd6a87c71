"""Checkpoints of the Accelerate loop: written by every process before they count as complete, checked before a
resume uses them, limited in number (the best evaluated one kept), and a full disk reported as such."""

import errno
import json
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from ..utils.output_files import write_json
from ..processing_maft import MaftProcessor


CHECKPOINT_PREFIX = "checkpoint-"
# Written last, by the main process, once every process's files are in the checkpoint: the checkpoint's file list.
MANIFEST_NAME = "checkpoint_manifest.json"
# The `save_pretrained` model and processor (to use or publish); the training state is beside it.
MODEL_FOLDER = "model"
# Where `prune_checkpoints` moves a checkpoint before deleting it, so that a half-deleted one never looks complete.
STALE_SUFFIX = ".stale"
# The metrics of the model of a checkpoint evaluated during training (`maft.evaluation.evaluate_on_dataset`).
EVALUATION_NAME = "eval_results.json"


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX) :])


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first. One being written is `checkpoint-N.partial` until every process's files
    are in it; `checkpoint_problem` tells whether a finished one is still sound."""
    directory = Path(output_dir)
    checkpoints = [path for path in directory.glob(f"{CHECKPOINT_PREFIX}*") if path.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(checkpoints, key=checkpoint_step)


def selection_metric(results: dict[str, float]) -> str:
    """The metric that ranks evaluated checkpoints: hIoU when the evaluation has unseen classes, else mIoU."""
    return "hIoU" if "hIoU" in results else "mIoU"


def best_checkpoint(output_dir: str | os.PathLike) -> tuple[Path, str, float] | None:
    """The complete checkpoint whose recorded evaluation is best by `selection_metric` (the newer on a tie; NaN
    ranks last), with the metric's name and value; None when no checkpoint holds an evaluation."""
    best = None
    for checkpoint in complete_checkpoints(output_dir):
        path = checkpoint / EVALUATION_NAME
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        metric = selection_metric(results)
        value = results[metric]
        if best is None or math.isnan(best[2]) or value >= best[2]:
            best = (checkpoint, metric, value)
    return best


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, naming the file at fault, or None when it is sound: its manifest lists
    every process's files, and each of them is present with its recorded size and loads."""
    manifest_path = checkpoint / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"{manifest_path} is missing: the checkpoint was not completed by every process"
    try:
        sizes = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"{manifest_path} is unreadable ({error})"
    for name, size in sizes.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix in (".bin", ".pkl", ".pt"):
                torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # whatever a damaged file raises while it is read
            return f"{path} does not load ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return None


class CheckpointStore:
    """
    The checkpoints of one run in `output_dir`. `checkpoint-N` holds the Accelerate training state (optimizer,
    scheduler, sampler, every process's random states) and, in `model/`, the `save_pretrained` model and processor.
    The model weights are stored once, in `model/`: Accelerate's copy of them is left out of the state and resuming
    reads `model/`. Only the newest `total_limit` checkpoints are kept (all with None), and beside them the
    `best_checkpoint` of those evaluated during training (`eval_results.json` in the checkpoint).
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path, total_limit: int | None):
        self.accelerator, self.output_dir, self.total_limit = accelerator, output_dir, total_limit
        accelerator.register_save_state_pre_hook(lambda models, weights, directory: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, directory: models.clear())

    def save(self, model, processor: MaftProcessor, step: int, card: ModelCard | None = None,
             protected: set[Path] = frozenset(), evaluation: dict[str, float] | None = None) -> Path:
        """Writes `checkpoint-{step}` (with the model's `evaluation`, if given) as `checkpoint-{step}.partial`, renamed
        once every process's files are in it; then removes the oldest checkpoints beyond the limit except the best
        evaluated one and `protected` ones (e.g. being uploaded)."""
        accelerator = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        partial = self.output_dir / f"{CHECKPOINT_PREFIX}{step}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        failure = None
        try:
            accelerator.save_state(str(partial))
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(partial / MODEL_FOLDER)
                processor.save_pretrained(partial / MODEL_FOLDER)
                if card is not None:
                    card.save(partial / MODEL_FOLDER / "README.md")
                if evaluation is not None:
                    write_json(partial / EVALUATION_NAME, evaluation)
        except (OSError, RuntimeError) as error:
            failure = error
        # also the barrier: no process's files are missing once every process has reported
        failures = [report for report in gather_object([failure and self.describe_write_failure(partial, failure)]) if report]
        if failures:
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            disk_full, message = failures[0]
            raise (OSError(errno.ENOSPC, message) if disk_full else RuntimeError(message)) from failure
        if accelerator.is_main_process:
            self.write_manifest(partial)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            self.prune(protected | {final})
        accelerator.wait_for_everyone()
        return final

    def write_manifest(self, partial: Path) -> None:
        missing = [f"random_states_{rank}.pkl" for rank in range(self.accelerator.num_processes)
                   if not (partial / f"random_states_{rank}.pkl").is_file()]
        if missing:
            raise RuntimeError(f"{partial} lacks {', '.join(missing)} after every process saved its state.")
        files = {str(path.relative_to(partial)): path.stat().st_size for path in sorted(partial.rglob("*")) if path.is_file()}
        temporary = partial / f"{MANIFEST_NAME}.tmp"
        temporary.write_text(json.dumps({"files": files}, indent=1))
        os.replace(temporary, partial / MANIFEST_NAME)

    def describe_write_failure(self, partial: Path, error: Exception) -> tuple[bool, str]:
        """(whether the disk is full, one line) for a failed checkpoint write; a full disk says so, with the free
        space left."""
        text = str(error)
        disk_full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or "PytorchStreamWriter failed" in text \
            or "inline_container" in text
        if not disk_full:
            return False, f"Could not write the checkpoint {partial}: {type(error).__name__}: {text}"
        free = shutil.disk_usage(self.output_dir).free
        newest = complete_checkpoints(self.output_dir)
        return True, (f"Could not write the checkpoint {partial}: no space left on the device ({free / 2**20:.0f} MiB free in "
                f"{self.output_dir}). Free some space or lower `save_total_limit` (now {self.total_limit}); "
                + (f"the newest complete checkpoint is {newest[-1]}." if newest else "there is no complete checkpoint yet."))

    def prune(self, protected: set[Path]) -> None:
        """Deletes the oldest checkpoints beyond the limit but the best evaluated one, first renamed `*.stale` so that
        none is ever half there."""
        for leftover in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*{STALE_SUFFIX}"):
            shutil.rmtree(leftover, ignore_errors=True)
        if self.total_limit is None:
            return
        checkpoints = complete_checkpoints(self.output_dir)
        best = best_checkpoint(self.output_dir)
        kept = set(protected) | ({best[0]} if best else set())
        for checkpoint in checkpoints[: max(0, len(checkpoints) - self.total_limit)]:
            if checkpoint not in kept:
                stale = checkpoint.with_name(checkpoint.name + STALE_SUFFIX)
                os.replace(checkpoint, stale)
                shutil.rmtree(stale)

    def newest_sound(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that passes `checkpoint_problem` (chosen by the main process, for every process),
        and the problems of the newer ones skipped."""
        choice: list = [None, []]
        if self.accelerator.is_main_process:
            for checkpoint in reversed(complete_checkpoints(self.output_dir)):
                problem = checkpoint_problem(checkpoint)
                if problem is None:
                    choice[0] = checkpoint
                    break
                choice[1].append(problem)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(choice)
        return choice[0], choice[1]

    def load(self, model, checkpoint: Path) -> int:
        """Restores the training state and the model weights of `checkpoint`; returns its step."""
        self.accelerator.load_state(str(checkpoint))
        weights = {}
        for shard in sorted((checkpoint / MODEL_FOLDER).glob("*.safetensors")):  # one file, or shards of a large model
            weights.update(load_file(shard, device=str(self.accelerator.device)))
        self.accelerator.unwrap_model(model).load_state_dict(weights)
        return checkpoint_step(checkpoint)

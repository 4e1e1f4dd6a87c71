"""Training under faults: damaged checkpoints, signals, a full disk, bad data, a Hub that refuses, dies or hangs."""

import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.tracking import GeneralTracker

from helpers import CLASS_NAMES, launch_two_processes, save_training_inputs, synthetic_dataset, tiny_model, tiny_processor
from maft.training import (
    MASK_AWARE_FINE_TUNING_RECIPE, MaftTrainingArguments, MaftTrainingCollator, best_checkpoint, complete_checkpoints, train,
)
from maft.training.checkpoints import MANIFEST_NAME, checkpoint_problem
from maft.training.publishing import FinalModelNotPublishedError, HubPublisher


def run_tiny(output_dir, dataset=None, max_steps=2, evaluator=None, **run_settings):
    recipe = MASK_AWARE_FINE_TUNING_RECIPE.replace(batch_size=2, max_steps=max_steps, learning_rate=1e-3)
    arguments = MaftTrainingArguments(output_dir=str(output_dir), recipe=recipe, **{"save_steps": 1, **run_settings})
    processor = tiny_processor()
    return train(tiny_model(), processor, synthetic_dataset() if dataset is None else dataset, MaftTrainingCollator(processor),
                 CLASS_NAMES, arguments, evaluator=evaluator)


def checkpoint_names(output_dir) -> list[str]:
    return [path.name for path in complete_checkpoints(output_dir)]


def test_resume_skips_a_damaged_newest_checkpoint_and_says_which_file(tmp_path, capsys):
    run_tiny(tmp_path, max_steps=2)
    damaged = tmp_path / "checkpoint-2" / "model" / "model.safetensors"
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # same size: only reading it finds the damage
    assert checkpoint_problem(tmp_path / "checkpoint-2").startswith(f"{damaged} does not load")
    (tmp_path / "checkpoint-3").mkdir()  # a checkpoint some process never finished: no manifest
    capsys.readouterr()
    run_tiny(tmp_path, max_steps=2, resume=True)
    err = capsys.readouterr().err
    assert f"skipping a damaged checkpoint: {tmp_path / 'checkpoint-3' / MANIFEST_NAME} is missing" in err
    assert f"skipping a damaged checkpoint: {damaged} does not load" in err
    assert "resumed from checkpoint-1 at step 1" in err
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None  # step 2 trained again and saved anew


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    run_tiny(tmp_path, max_steps=1, resume=True)
    assert f"{tmp_path} has no sound checkpoint: starting from step 0" in capsys.readouterr().err
    assert checkpoint_names(tmp_path) == ["checkpoint-1"]


def test_a_checkpoint_lacking_a_process_file_is_never_complete(tmp_path):
    run_tiny(tmp_path, max_steps=1)
    checkpoint = tmp_path / "checkpoint-1"
    (checkpoint / "random_states_0.pkl").unlink()
    assert checkpoint_problem(checkpoint) == f"{checkpoint / 'random_states_0.pkl'} is missing"


def test_checkpoints_are_limited_to_the_newest_and_hold_the_weights_once(tmp_path):
    run_tiny(tmp_path, max_steps=4, save_total_limit=2)
    assert checkpoint_names(tmp_path) == ["checkpoint-3", "checkpoint-4"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]  # nothing stale left
    checkpoint = tmp_path / "checkpoint-4"
    weight_files = [path.relative_to(checkpoint).as_posix() for path in checkpoint.rglob("*.safetensors")]
    assert weight_files == ["model/model.safetensors"]
    with pytest.raises(ValueError, match="`save_total_limit` must be at least 1"):
        MaftTrainingArguments(output_dir="x", save_total_limit=0)


class ScriptedEvaluator:
    """Metrics given in advance, one set per evaluation, so that the best checkpoint is a chosen older one. Like
    `evaluate_on_dataset` it puts the model in eval mode; it records whether training had put it back in train mode."""

    def __init__(self, metrics: list[dict[str, float]]):
        self.metrics, self.modes = list(metrics), []

    def __call__(self, model, processor, device):
        self.modes.append(model.training)
        model.eval()
        return self.metrics.pop(0)


def test_the_best_evaluated_checkpoint_outlives_the_rotation(tmp_path, capsys):
    evaluator = ScriptedEvaluator([{"mIoU": value} for value in (10.0, 50.0, 20.0, 30.0, 40.0)])
    run_tiny(tmp_path, max_steps=5, save_total_limit=2, evaluator=evaluator)
    assert checkpoint_names(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]  # the newest 2 and the best
    assert json.loads((tmp_path / "checkpoint-2" / "eval_results.json").read_text()) == {"mIoU": 50.0}
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None  # the evaluation is part of the checkpoint
    assert best_checkpoint(tmp_path) == (tmp_path / "checkpoint-2", "mIoU", 50.0)
    assert json.loads((tmp_path / "eval_results.json").read_text()) == {"mIoU": 40.0}  # the final model's
    err = capsys.readouterr().err
    assert "maft: evaluation at step 5: mIoU 40.00" in err and "maft: best checkpoint by mIoU: checkpoint-2 (mIoU 50.00)" in err


def test_with_unseen_classes_the_best_is_chosen_by_hiou_every_eval_steps(tmp_path, capsys):
    scripted = [{"mIoU": 10.0, "hIoU": 60.0}, {"mIoU": 90.0, "hIoU": 20.0}, {"mIoU": 90.0, "hIoU": 30.0}]
    evaluator = ScriptedEvaluator(scripted)
    run_tiny(tmp_path, max_steps=5, save_total_limit=1, eval_steps=2, evaluator=evaluator)
    assert evaluator.metrics == [] and evaluator.modes == [True, True, True]  # steps 2, 4 and the last
    assert "maft: evaluation at step 4: mIoU 90.00, hIoU 20.00" in capsys.readouterr().err
    assert checkpoint_names(tmp_path) == ["checkpoint-2", "checkpoint-5"]
    assert best_checkpoint(tmp_path) == (tmp_path / "checkpoint-2", "hIoU", 60.0)
    with pytest.raises(ValueError, match=r"`eval_steps` must be a positive multiple of `save_steps` \(2\).*got 3"):
        MaftTrainingArguments(output_dir="x", save_steps=2, eval_steps=3)


def test_a_full_disk_is_one_error_naming_the_checkpoint(tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        saves.append(f)
        if any("checkpoint-2" in str(path) for path in saves):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(OSError, match="no space left on the device") as raised:
        run_tiny(tmp_path, max_steps=3)
    assert raised.value.errno == errno.ENOSPC
    message = str(raised.value)
    assert str(tmp_path / "checkpoint-2.partial") in message and f"the newest complete checkpoint is {tmp_path / 'checkpoint-1'}" in message
    assert "save_total_limit" in message and "\n" not in message
    assert checkpoint_names(tmp_path) == ["checkpoint-1"] and not (tmp_path / "checkpoint-2.partial").exists()


def test_labels_outside_the_vocabulary_name_the_example_and_an_empty_set_is_refused(tmp_path):
    dataset = synthetic_dataset()
    dataset[3]["label"] = np.where(dataset[3]["label"] == 1, 7, dataset[3]["label"])
    with pytest.raises(ValueError, match=r"Training example 3 has label values \[7\] outside the vocabulary: labels must be class "
                                         r"indices 0\.\.2 or the ignore index 255"):
        run_tiny(tmp_path / "bad", dataset, max_steps=4, save_steps=100)
    with pytest.raises(ValueError, match="The training set is empty"):
        run_tiny(tmp_path / "empty", [])


class RecordingTracker(GeneralTracker):
    name, requires_logging_directory, main_process_only = "recording", False, True

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.configuration = values

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.records.append((step, values))


def test_losses_learning_rate_and_throughput_go_to_trackers_and_the_console(tmp_path, capsys):
    tracker = RecordingTracker()
    run_tiny(tmp_path, max_steps=4, save_steps=4, logging_steps=2, trackers=[tracker])
    assert [step for step, _ in tracker.records] == [2, 4]
    for _, values in tracker.records:
        assert {"loss", "mask_aware_loss", "distillation_loss", "learning_rate", "samples_per_second"} == set(values)
        assert values["samples_per_second"] > 0 and np.isfinite(values["loss"])
    assert tracker.records[1][1]["learning_rate"] == 0.0  # the poly schedule ends at zero
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert "learning_rate 0.00e+00" in lines[1] and "samples_per_second" in lines[1]


TRAINING_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import CLASS_NAMES, synthetic_dataset, tiny_model, tiny_processor
    from maft.training import MASK_AWARE_FINE_TUNING_RECIPE, MaftTrainingArguments, MaftTrainingCollator, train

    recipe = MASK_AWARE_FINE_TUNING_RECIPE.replace(batch_size=2, max_steps=10000, learning_rate=1e-3)
    processor = tiny_processor()
    train(tiny_model(), processor, synthetic_dataset(), MaftTrainingCollator(processor), CLASS_NAMES,
          MaftTrainingArguments(output_dir={output_dir!r}, recipe=recipe, save_steps=10000, logging_steps=1))
""")


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits(tmp_path, signal_number, exit_code):
    script = tmp_path / "train_tiny.py"
    script.write_text(TRAINING_SCRIPT.format(tests=str(Path(__file__).parent), output_dir=str(tmp_path / "out")))
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    try:
        deadline = time.monotonic() + 240
        for line in process.stdout:  # training is under way once step 1 is logged
            if line.startswith("step 1/") or time.monotonic() > deadline:
                break
        process.send_signal(signal_number)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == exit_code, err[-3000:]
    checkpoints = complete_checkpoints(tmp_path / "out")
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None
    step = int(checkpoints[0].name.split("-")[1])
    assert 1 <= step < 10000
    assert f"stopped by {signal.Signals(signal_number).name} after step {step}" in err and "--resume" in err


def test_a_rejected_token_or_a_malformed_repo_id_stops_before_step_one(tmp_path, hub_server, monkeypatch):
    hub_server.token = "hf_local_test_token"
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    with pytest.raises(PermissionError, match="Cannot publish to the Hub repo 'user/maft-trained': the token was rejected") as raised:
        run_tiny(tmp_path, push_to_hub=True, hub_model_id="user/maft-trained")
    assert "no token was found" not in str(raised.value)
    assert checkpoint_names(tmp_path) == [] and "user/maft-trained" not in hub_server.repositories


def test_no_token_at_all_is_named_as_missing_with_how_to_provide_one(tmp_path, hub_server, monkeypatch):
    from huggingface_hub import constants

    hub_server.token = "hf_local_test_token"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_saved_login"))
    with pytest.raises(PermissionError) as raised:
        run_tiny(tmp_path / "out", push_to_hub=True, hub_model_id="user/maft-trained")
    assert str(raised.value).startswith("Cannot publish to the Hub repo 'user/maft-trained': no token was found (neither "
                                        "HF_TOKEN nor a saved login), and writing needs one (401). Log in with `hf auth login` "
                                        "or set HF_TOKEN to a token with write access")
    assert "rejected" not in str(raised.value) and checkpoint_names(tmp_path / "out") == []
    with pytest.raises(ValueError, match="`hub_model_id` 'user/maft/trained' is not a Hub repo id"):
        MaftTrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="user/maft/trained")


def test_an_unreachable_hub_stops_before_step_one(tmp_path, hub_server):
    hub_server.stop()
    with pytest.raises(ConnectionError, match="Cannot reach the Hub to publish to 'user/unreachable'"):
        run_tiny(tmp_path, push_to_hub=True, hub_model_id="user/unreachable")
    assert checkpoint_names(tmp_path) == []


def test_a_hanging_hub_never_holds_up_training_and_the_newest_checkpoint_is_sent_after_it(tmp_path, hub_server, monkeypatch, capsys):
    check_access, publish = HubPublisher.check_access, HubPublisher.publish
    publish_seconds = []

    def check_then_hang(self):
        check_access(self)
        hub_server.pause()  # accepts connections, answers nothing

    def timed_publish(self, step, folder):
        start = time.perf_counter()
        publish(self, step, folder)
        publish_seconds.append(time.perf_counter() - start)
        if step == 4:  # the Hub comes back once the upload of step 1 has timed out
            deadline = time.monotonic() + 30
            while 1 not in self.unpublished and time.monotonic() < deadline:
                time.sleep(0.05)
            hub_server.unpause()

    monkeypatch.setattr(HubPublisher, "check_access", check_then_hang)
    monkeypatch.setattr(HubPublisher, "publish", timed_publish)
    run_tiny(tmp_path, max_steps=4, push_to_hub=True, hub_model_id="user/maft-hang", hub_timeout=1.0, hub_upload_retries=1)
    assert len(publish_seconds) == 4 and max(publish_seconds) < 0.5
    summary = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maft: published to")]
    assert len(summary) == 1
    assert summary[0].startswith("maft: published to user/maft-hang: ") and "step 4" in summary[0].split("; not published")[0]
    assert "step 1 (" in summary[0].split("; not published: ")[1]  # sent while the Hub hung: never published
    assert "step 4 of 4" in hub_server.files("user/maft-hang")["README.md"].decode()


def test_a_hub_that_dies_mid_run_is_reported_at_the_end(tmp_path, hub_server, monkeypatch, capsys):
    check_access = HubPublisher.check_access

    def check_then_die(self):
        check_access(self)
        hub_server.stop()

    monkeypatch.setattr(HubPublisher, "check_access", check_then_die)
    with pytest.raises(FinalModelNotPublishedError) as raised:  # raised once training is over and saved
        run_tiny(tmp_path, max_steps=2, save_steps=2, push_to_hub=True, hub_model_id="user/maft-dies", hub_upload_retries=1)
    assert checkpoint_names(tmp_path) == ["checkpoint-2"] and checkpoint_problem(tmp_path / "checkpoint-2") is None
    assert (raised.value.repo_id, raised.value.step, raised.value.folder) == ("user/maft-dies", 2, tmp_path / "checkpoint-2" / "model")
    assert raised.value.reason.startswith("failed 1 times (ConnectError: ")
    summary = capsys.readouterr().err
    assert "maft: published to user/maft-dies: nothing; not published: step 2 (failed 1 times (" in summary


def test_the_checkpoint_limit_holds_once_a_hub_that_hung_answers_again(tmp_path, hub_server, monkeypatch, capsys):
    output_dir = tmp_path / "out"  # tmp_path also holds the Hub client's files
    check_access, publish = HubPublisher.check_access, HubPublisher.publish

    def check_then_hang(self):
        check_access(self)
        hub_server.pause()  # the upload of step 2 hangs, and its checkpoint is kept beyond the limit meanwhile

    def publish_and_answer_at_the_end(self, step, folder):
        publish(self, step, folder)
        if step == 20:
            assert self.folders_in_use() >= {output_dir / "checkpoint-2"}
            hub_server.unpause()

    monkeypatch.setattr(HubPublisher, "check_access", check_then_hang)
    monkeypatch.setattr(HubPublisher, "publish", publish_and_answer_at_the_end)
    run_tiny(output_dir, max_steps=20, save_steps=2, save_total_limit=3, push_to_hub=True, hub_model_id="user/maft-outage",
             hub_timeout=120.0, hub_upload_retries=1)
    summary = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maft: published to")]
    assert summary == ["maft: published to user/maft-outage: step 2, step 20; not published: "
                       + "; ".join(f"step {step} (superseded by step {step + 2})" for step in range(4, 20, 2))]
    assert checkpoint_names(output_dir) == ["checkpoint-16", "checkpoint-18", "checkpoint-20"]
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-16", "checkpoint-18", "checkpoint-20"]


def test_a_final_model_that_never_reached_the_hub_exits_3_naming_the_command_that_publishes_it(tmp_path, hub_server, monkeypatch,
                                                                                                capsys):
    from maft.cli import EXIT_NOT_PUBLISHED, main

    check_access = HubPublisher.check_access

    def check_then_die(self):
        check_access(self)
        hub_server.stop()

    monkeypatch.setattr(HubPublisher, "check_access", check_then_die)
    save_training_inputs(tmp_path)
    output_dir = tmp_path / "out"
    exit_code = main([
        "train", "--train-dataset", str(tmp_path / "data"), "--class-names", ", ".join(CLASS_NAMES), "--init-from",
        str(tmp_path / "init"), "--output-dir", str(output_dir), "--max-steps", "4", "--save-steps", "1", "--save-total-limit",
        "2", "--per-device-batch-size", "2", "--push-to-hub", "--hub-model-id", "user/maft-gone", "--hub-timeout", "5",
    ])
    assert exit_code == EXIT_NOT_PUBLISHED == 3
    out, err = capsys.readouterr()
    assert "trained 4 steps" in out and (output_dir / "model.safetensors").is_file()  # saved as when nothing fails
    assert checkpoint_names(output_dir) == ["checkpoint-3", "checkpoint-4"]  # the limit holds with every upload given up
    final_folder = output_dir / "checkpoint-4" / "model"
    command = shlex.join(["hf", "upload", "user/maft-gone", str(final_folder), ".", "--commit-message", "Training step 4"])
    last_line = err.splitlines()[-1]
    assert re.fullmatch(r"maft train: training finished and is saved, but the final model \(step 4\) did not reach the Hub "
                        r"repo user/maft-gone: failed 3 times \(ConnectError: .*Connection refused\)\. To publish it later, "
                        r"run: " + re.escape(command), last_line), last_line
    assert "maft: published to user/maft-gone: nothing; not published: step 1 (" in err and "step 4 (failed 3 times (" in err

    hub_server.start()  # the Hub is back (on another port, with the same repositories): the printed command publishes
    environment = {**os.environ, "HF_ENDPOINT": hub_server.endpoint,
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, shell=True, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    published = hub_server.files("user/maft-gone")
    published.pop(".gitattributes")
    saved = {path.relative_to(final_folder).as_posix(): path.read_bytes() for path in final_folder.rglob("*") if path.is_file()}
    assert published == saved and "step 4 of 4" in published["README.md"].decode()


SLOW_SECOND_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import time
    sys.path.insert(0, {tests!r})
    from accelerate import Accelerator
    from helpers import CLASS_NAMES, synthetic_dataset, tiny_model, tiny_processor
    from maft.training import MASK_AWARE_FINE_TUNING_RECIPE, MaftTrainingArguments, MaftTrainingCollator, train

    save_state = Accelerator.save_state

    def slow_on_the_second_process(self, *args, **kwargs):
        if self.process_index == 1:
            time.sleep(3)
        return save_state(self, *args, **kwargs)

    Accelerator.save_state = slow_on_the_second_process
    recipe = MASK_AWARE_FINE_TUNING_RECIPE.replace(batch_size=1, max_steps=1, learning_rate=1e-3)
    processor = tiny_processor()
    train(tiny_model(), processor, synthetic_dataset(), MaftTrainingCollator(processor), CLASS_NAMES,
          MaftTrainingArguments(output_dir={output_dir!r}, recipe=recipe, save_steps=1))
""")


def test_a_slow_process_is_waited_for_before_a_checkpoint_counts_as_complete(tmp_path):
    script = tmp_path / "train_two.py"
    script.write_text(SLOW_SECOND_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent), output_dir=str(tmp_path / "out")))
    result = launch_two_processes([str(script)])
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert checkpoint_names(tmp_path / "out") == ["checkpoint-1"] and not (tmp_path / "out" / "checkpoint-1.partial").exists()
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {path.name for path in checkpoint.iterdir()}
    assert checkpoint_problem(checkpoint) is None

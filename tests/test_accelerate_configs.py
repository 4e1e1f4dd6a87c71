"""The shipped Accelerate configuration launches `maft train` (with evaluation) as real processes."""

import json

from helpers import CLASS_NAMES, launch_two_processes, save_training_inputs
from maft.training.accelerate_configs import MULTI_GPU_CONFIG
from maft.training.checkpoints import checkpoint_problem


def test_the_multi_gpu_config_trains_and_evaluates_with_two_processes(tmp_path):
    save_training_inputs(tmp_path)
    result = launch_two_processes([
        "-m", "maft", "train", "--train-dataset", str(tmp_path / "data"), "--class-names", ", ".join(CLASS_NAMES),
        "--init-from", str(tmp_path / "init"), "--output-dir", str(tmp_path / "out"), "--eval-dataset", str(tmp_path / "data"),
        "--max-steps", "2", "--save-steps", "1", "--per-device-batch-size", "1", "--learning-rate", "1e-3",
        "--save-total-limit", "1",
    ], timeout=420, config_file=MULTI_GPU_CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {path.name for path in checkpoint.iterdir()}  # two ranks trained
    assert checkpoint_problem(checkpoint) is None
    for rank in (0, 1):  # and evaluated half of the 4 examples each, at both steps
        assert result.stderr.count(f"maft: process {rank} of 2 evaluates 2 of 4 examples") == 2, result.stderr[-3000:]
    assert result.stdout.count("trained 2 steps") == 1 and result.stdout.count("| mIoU |") == 1  # the main process reports
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results == json.loads((checkpoint / "eval_results.json").read_text()) and 0 <= results["mIoU"] <= 100
    assert (tmp_path / "out" / "model.safetensors").is_file()

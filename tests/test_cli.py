"""The `maft` command line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maft.cli import main
from maft.evaluation.benchmark_datasets import benchmark_class_names


def test_ipclip_example_prints_a_similarity_matrix(capsys):
    assert main(["ipclip-example"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "embeddings (4, 32)" in lines[0]
    matrix = [[float(value) for value in line.split()[1:]] for line in lines[3:7]]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    assert all(abs(matrix[index][index] - 1.0) < 1e-3 for index in range(4))
    # Different quadrants of a four-colour image give different embeddings.
    assert all(matrix[row][column] < 0.999 for row in range(4) for column in range(4) if row != column)


def test_console_script_rejects_unknown_commands():
    result = subprocess.run([sys.executable, "-m", "maft.cli", "no-such-command"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_segment_writes_overlay_label_map_and_fractions_and_reports_bad_images(tmp_path, capsys):
    from helpers import random_image, tiny_model, tiny_processor

    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    good = tmp_path / "street.png"
    random_image(70, 50).save(good)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"not a png")
    output = tmp_path / "out"

    exit_code = main(["segment", str(good), str(corrupt), "--labels", "cat, sofa, wall", "--model", str(model_dir), "--output", str(output)])

    assert exit_code == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.png" in captured.err
    assert "segmented 1 of 2 images" in captured.out
    overlay = Image.open(output / "street_overlay.png")
    assert overlay.height == 50 and overlay.width > 70  # the image plus its legend
    label_map = np.asarray(Image.open(output / "street_labels.png"))
    assert label_map.shape == (50, 70) and label_map.max() < 3
    summary = json.loads((output / "street.json").read_text())
    assert summary["labels"] == ["cat", "sofa", "wall"]
    assert abs(sum(summary["fractions"].values()) - 1.0) < 1e-5
    for name, fraction in summary["fractions"].items():
        assert abs(fraction - (label_map == summary["labels"].index(name)).mean()) < 1e-5
    assert not (output / "broken_overlay.png").exists()


def test_segment_rejects_empty_labels(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "x.png", "--labels", "cat,,dog"])
    assert capsys.readouterr().err == (
        "maft segment: argument --labels: must be a comma-separated list of non-empty class names, got 'cat,,dog' "
        "(--help shows the usage)\n"
    )


def test_train_command_trains_saves_and_evaluates(tmp_path, capsys):
    from helpers import CLASS_NAMES, save_training_inputs

    save_training_inputs(tmp_path)
    exit_code = main([
        "train", "--train-dataset", str(tmp_path / "data"), "--class-names", ", ".join(CLASS_NAMES),
        "--init-from", str(tmp_path / "init"), "--output-dir", str(tmp_path / "out"), "--eval-dataset", str(tmp_path / "data"),
        "--max-steps", "2", "--save-steps", "1", "--per-device-batch-size", "2", "--learning-rate", "1e-3",
    ])
    assert exit_code == 0
    output, err = capsys.readouterr()
    assert "trained 2 steps" in output and "| mIoU | fwIoU | mACC | pACC |" in output
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "checkpoint-2").is_dir()
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert 0 <= results["mIoU"] <= 100 and {f"IoU-{name}" for name in CLASS_NAMES} <= set(results)
    # evaluated at each checkpoint (--eval-steps defaults to --save-steps); the final metrics are the last checkpoint's
    for step in (1, 2):
        assert set(json.loads((tmp_path / "out" / f"checkpoint-{step}" / "eval_results.json").read_text())) == set(results)
    assert json.loads((tmp_path / "out" / "checkpoint-2" / "eval_results.json").read_text()) == results
    assert "best checkpoint by mIoU: checkpoint-" in err  # same vocabulary in training and evaluation: no unseen classes


def test_evaluate_command_reports_metrics(tmp_path, capsys):
    from helpers import CLASS_NAMES, save_training_inputs

    save_training_inputs(tmp_path)
    exit_code = main([
        "evaluate", "--model", str(tmp_path / "init"), "--dataset", str(tmp_path / "data"),
        "--class-names", ", ".join(CLASS_NAMES), "--unseen-class-names", "sky", "--output", str(tmp_path / "results.json"),
    ])
    assert exit_code == 0
    assert "| mIoU | fwIoU | mACC | pACC | mIoU-seen | mIoU-unseen | hIoU |" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["mIoU"] <= 100 and 0 <= results["pACC"] <= 100 and "IoU-sky" in results


@pytest.mark.parametrize("command", [("evaluate", "--model", "m", "--dataset", "d", "--batch-size"),
                                     ("train", "--train-dataset", "d", "--init-from", "m", "--output-dir", "o", "--eval-batch-size")])
def test_batch_sizes_must_be_positive(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "0"])
    assert exited.value.code == 2
    assert f"argument {command[-1]}: must be a positive integer, got '0'" in capsys.readouterr().err


def test_eval_steps_without_an_eval_dataset_is_refused(tmp_path, capsys):
    assert main(["train", "--train-dataset", "d", "--init-from", "m", "--output-dir", str(tmp_path / "o"), "--eval-steps", "2"]) == 1
    assert capsys.readouterr().err == "maft train: --eval-steps needs --eval-dataset (the dataset to evaluate on)\n"


def test_evaluate_reads_a_benchmark_in_the_original_layout_with_its_ignore_index(tmp_path, capsys):
    from helpers import ORIGINAL_VAL_LAYOUT, write_split
    from helpers import tiny_model, tiny_processor

    tiny_model().save_pretrained(tmp_path / "model")
    tiny_processor().save_pretrained(tmp_path / "model")
    write_split(tmp_path / "data", *ORIGINAL_VAL_LAYOUT["ade20k_847"], num_classes=847, ignore_index=65535)
    exit_code = main(["evaluate", "--model", str(tmp_path / "model"), "--benchmark", "ade20k_847", "--data-root",
                      str(tmp_path / "data"), "--output", str(tmp_path / "results.json")])
    assert exit_code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len([key for key in results if key.startswith("IoU-")]) == 847
    # each label map: the last class in half of it, its first row 65535, which must be ignored (or it is out of range)
    last_class = benchmark_class_names("ade20k_847")[-1]
    assert 0 <= results[f"ACC-{last_class}"] <= 100
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--benchmark", "ade20k_847"]) == 1
    assert "maft evaluate: the benchmark ade20k_847 needs its data root" in capsys.readouterr().err


def test_the_collator_maps_a_dataset_ignore_index_to_the_processor_one():
    from maft.training import MaftTrainingCollator
    from helpers import random_image, tiny_processor

    label = np.array([[65535, 1], [2, 65535]], dtype=np.int64).repeat(16, axis=0).repeat(16, axis=1)
    collator = MaftTrainingCollator(tiny_processor(), label_ignore_index=65535)
    labels = collator([{"image": random_image(32, 32), "label": label}])["labels"][0]
    assert set(labels.unique().tolist()) == {1, 2, 255}


def test_segment_in_bfloat16_with_the_bundled_model(tmp_path):
    examples = Path(__file__).resolve().parents[1] / "maft" / "pretrained" / "examples"
    assert main(["segment", str(examples / "scene-4.png"), "--labels", "checkered wall, dotted floor", "--dtype", "bfloat16",
                 "--output", str(tmp_path)]) == 0
    assert (tmp_path / "scene-4_labels.png").is_file()

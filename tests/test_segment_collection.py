"""`maft segment` over collections: inputs, batching and workers, sharding over processes, resuming, the manifest,
the dataset output and its upload, and `--dtype auto`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import launch_two_processes, random_image, tiny_model, tiny_processor
from maft.cli import main


LABELS = "cat, sofa, wall"
SIZES = [(70, 50), (40, 64), (64, 64), (33, 90), (80, 30)]  # (width, height): uneven, so batches pad


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """(a tiny model folder, a folder of images of different sizes in two subfolders, the image paths in order)."""
    root = tmp_path_factory.mktemp("collection")
    tiny_model().save_pretrained(root / "model")
    tiny_processor().save_pretrained(root / "model")
    paths = []
    for index, (width, height) in enumerate(SIZES):
        path = root / "images" / ("a" if index < 3 else "b") / f"photo{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(width, height, seed=index).save(path)
        paths.append(path)
    return root / "model", root / "images", paths


def segment(model: Path, inputs: list[str], output: Path, *options: str) -> int:
    return main(["segment", *inputs, "--labels", LABELS, "--model", str(model), "--output", str(output), "--dtype", "float32", *options])


def output_files(folder: Path, names: list[str], suffixes=("_labels.png", "_overlay.png", ".json")) -> dict[str, bytes]:
    return {f"{name}{suffix}": (folder / f"{name}{suffix}").read_bytes() for name in names for suffix in suffixes}


def test_folder_glob_path_list_and_dataset_give_the_same_outputs_at_any_batch_size(collection, tmp_path):
    from datasets import Dataset, Image as ImageFeature

    model, folder, paths = collection
    names = [path.stem for path in paths]
    assert segment(model, [str(folder)], tmp_path / "folder", "--batch-size", "1", "--num-workers", "0") == 0
    reference = output_files(tmp_path / "folder", names)
    assert sorted(path.name for path in (tmp_path / "folder").glob("*.png")) == sorted(
        f"{name}{suffix}" for name in names for suffix in ("_labels.png", "_overlay.png"))

    assert segment(model, [f"{folder}/**/*.png"], tmp_path / "glob", "--batch-size", "3", "--num-workers", "2") == 0
    assert output_files(tmp_path / "glob", names) == reference
    path_list = tmp_path / "images.txt"
    path_list.write_text("# the collection\n" + "\n".join(map(str, paths)) + "\n\n")
    assert segment(model, [str(path_list)], tmp_path / "list", "--batch-size", "2", "--num-workers", "1") == 0
    assert output_files(tmp_path / "list", names) == reference

    Dataset.from_dict({"picture": [str(path) for path in paths], "name": names}).cast_column(
        "picture", ImageFeature()).save_to_disk(tmp_path / "dataset")
    for streaming in ([], ["--streaming"]):
        output = tmp_path / f"dataset-output{len(streaming)}"
        assert segment(model, [], output, "--dataset", str(tmp_path / "dataset"), "--image-column", "picture",
                       "--id-column", "name", "--batch-size", "4", *streaming) == 0
        image_outputs = output_files(output, names, suffixes=("_labels.png", "_overlay.png"))
        assert image_outputs == {key: value for key, value in reference.items() if key.endswith(".png")}
        summary = json.loads((output / "photo4.json").read_text())
        assert summary["image"] == f"{tmp_path / 'dataset'}[4]"
        assert summary["fractions"] == json.loads(reference["photo4.json"])["fractions"]


def test_inputs_that_name_no_images_are_refused(collection, tmp_path, capsys):
    model, folder, _ = collection
    (tmp_path / "empty").mkdir()
    assert segment(model, [str(tmp_path / "empty")], tmp_path / "out") == 1
    assert f"the folder {tmp_path / 'empty'} holds no images" in capsys.readouterr().err
    assert segment(model, [f"{folder}/*.jpg"], tmp_path / "out") == 1
    assert "matches no images" in capsys.readouterr().err
    assert segment(model, [str(folder)], tmp_path / "out", "--dataset", str(folder)) == 1
    assert "not both or neither" in capsys.readouterr().err
    assert segment(model, [str(folder)], tmp_path / "out", "--push-to-hub", "user/labels") == 1
    assert capsys.readouterr().err == "maft segment: --push-to-hub publishes the dataset output: add --output-format dataset\n"
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_a_streamed_dataset_is_read_as_it_goes(collection, tmp_path, monkeypatch):
    from datasets import IterableDataset

    from maft.cli import image_collections
    from maft.cli.image_collections import DatasetCollection
    from maft.cli.segment_collection import OutputWriter, output_writer, segment_collection

    model_path, _, paths = collection
    rows_read = []

    def rows():
        for path in paths:
            rows_read.append(path)
            yield {"image": Image.open(path)}

    read_before_each_write = []
    semantic = output_writer("semantic")

    def write(*args, **kwargs):
        read_before_each_write.append(len(rows_read))
        return semantic.write(*args, **kwargs)

    from maft import MaftModel, MaftProcessor

    model, processor = MaftModel.from_pretrained(model_path).eval(), MaftProcessor.from_pretrained(model_path)
    monkeypatch.setattr(image_collections, "STREAM_READ_SIZE", 1)
    stream = DatasetCollection(IterableDataset.from_generator(rows), "image", None, "stream")
    summary = segment_collection(model, processor, stream, ["cat", "sofa", "wall"], tmp_path,
                                 writer=OutputWriter("semantic", semantic.paths, write), batch_size=2)
    assert summary.done == len(paths)
    assert read_before_each_write == [2, 2, 4, 4, 5]  # a batch is read, segmented and written before the next is read
    assert sorted(path.name for path in tmp_path.glob("*_labels.png")) == [f"{index:06d}_labels.png" for index in range(len(paths))]


def test_two_processes_give_the_outputs_of_one(collection, tmp_path):
    model, folder, paths = collection
    names = [path.stem for path in paths]
    options = ["--labels", LABELS, "--model", str(model), "--dtype", "float32", "--output-format", "dataset"]
    assert main(["segment", str(folder), "--output", str(tmp_path / "one"), *options]) == 0

    result = launch_two_processes(["-m", "maft", "segment", str(folder), "--output", str(tmp_path / "two"),
                                   "--batch-size", "2", "--num-workers", "1", *options], timeout=300)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "segmented 5 of 5 images" in result.stdout and result.stdout.count("segmented 5 of 5") == 1
    counts = [json.loads((tmp_path / "two" / ".maft-progress" / f"process-{index}.json").read_text()) for index in (0, 1)]
    assert [count["done"] for count in counts] == [3, 2]  # positions 0, 2, 4 and 1, 3
    assert output_files(tmp_path / "two", names) == output_files(tmp_path / "one", names)
    from datasets import load_from_disk

    one, two = load_from_disk(tmp_path / "one" / "dataset"), load_from_disk(tmp_path / "two" / "dataset")
    assert two["id"] == one["id"] == names and two["position"] == list(range(len(paths)))
    assert two.data.equals(one.data)


def test_a_killed_run_resumes_to_the_outputs_of_an_uninterrupted_one(collection, tmp_path, capsys):
    model, folder, _ = collection
    many = tmp_path / "many"
    many.mkdir()
    names = [f"image{index:02d}" for index in range(24)]
    for index, name in enumerate(names):
        random_image(96 + index, 64, seed=index).save(many / f"{name}.png")
    assert segment(model, [str(many)], tmp_path / "straight") == 0

    command = [sys.executable, "-m", "maft", "segment", str(many), "--labels", LABELS, "--model", str(model),
               "--output", str(tmp_path / "killed"), "--dtype", "float32", "--batch-size", "1", "--num-workers", "0"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "killed").glob("*.json"))) < 4 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    complete_before = len(list((tmp_path / "killed").glob("image*.json")))
    assert 0 < complete_before < len(names), "the run was not killed midway"

    capsys.readouterr()
    assert segment(model, [str(many)], tmp_path / "killed") == 0

    assert f"({complete_before} already complete, 0 failed)" in capsys.readouterr().out
    assert output_files(tmp_path / "killed", names) == output_files(tmp_path / "straight", names)
    assert not list((tmp_path / "killed").glob(".*.partial-*"))


def test_a_rerun_with_another_vocabulary_or_model_is_refused_unless_overwriting(collection, tmp_path, capsys):
    model, folder, paths = collection
    assert segment(model, [str(paths[0])], tmp_path) == 0
    manifest = json.loads((tmp_path / "maft-manifest.json").read_text())
    assert manifest["labels"] == ["cat", "sofa", "wall"] and manifest["dtype"] == "float32" and manifest["model"] == str(model)
    capsys.readouterr()

    assert main(["segment", str(paths[0]), "--labels", "cat, sofa", "--model", str(model), "--output", str(tmp_path),
                 "--dtype", "bfloat16"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"maft segment: {tmp_path} holds the outputs of a different run (labels ['cat', 'sofa', 'wall'] "
                            "there, ['cat', 'sofa'] now; dtype 'float32' there, 'bfloat16' now)")
    assert error.count("\n") == 1

    labels_before = (tmp_path / "photo0_labels.png").stat().st_mtime_ns
    assert segment(model, [str(paths[0])], tmp_path) == 0
    assert "(1 already complete, 0 failed)" in capsys.readouterr().out
    assert (tmp_path / "photo0_labels.png").stat().st_mtime_ns == labels_before
    assert main(["segment", str(paths[0]), "--labels", "cat, sofa", "--model", str(model), "--output", str(tmp_path),
                 "--dtype", "float32", "--overwrite"]) == 0
    assert json.loads((tmp_path / "photo0.json").read_text())["labels"] == ["cat", "sofa"]
    assert json.loads((tmp_path / "maft-manifest.json").read_text())["labels"] == ["cat", "sofa"]


def test_the_dataset_output_round_trips_through_load_from_disk_and_the_hub(collection, tmp_path, hub_server, capsys):
    from datasets import load_dataset, load_from_disk
    from huggingface_hub import snapshot_download

    model, folder, paths = collection
    assert segment(model, [str(folder)], tmp_path / "out", "--output-format", "dataset", "--push-to-hub", "user/segmentations") == 0
    assert "pushed to" in capsys.readouterr().out

    dataset = load_from_disk(tmp_path / "out" / "dataset")
    assert dataset["id"] == [path.stem for path in paths] and dataset["image"] == [str(path) for path in paths]
    for row in dataset:
        files_label_map = np.asarray(Image.open(tmp_path / "out" / f"{row['id']}_labels.png"))
        np.testing.assert_array_equal(np.asarray(row["label_map"]), files_label_map)
        fractions = json.loads((tmp_path / "out" / f"{row['id']}.json").read_text())["fractions"]
        assert row["class_fractions"] == pytest.approx({name: fractions.get(name, 0.0) for name in ["cat", "sofa", "wall"]})

    local = snapshot_download("user/segmentations", repo_type="dataset", local_dir=tmp_path / "download")
    assert (Path(local) / "README.md").read_text().count("`cat`") == 1
    downloaded = load_dataset("parquet", data_files=str(Path(local) / "data" / "*.parquet"), split="train",
                              cache_dir=str(tmp_path / "cache"))
    assert downloaded.data.equals(dataset.data)


def test_the_panoptic_dataset_output_holds_the_files_and_is_a_maft_panoptic_dataset(collection, tmp_path, capsys):
    from datasets import load_from_disk

    from maft.data.segmentation_data import panoptic_thing_class_ids, segmentation_metadata

    model, folder, paths = collection
    output = tmp_path / "out"
    panoptic = ["--task", "panoptic", "--stuff", "wall", "--threshold", "0.1"]
    assert segment(model, [str(folder)], output, *panoptic, "--output-format", "dataset") == 0

    dataset = load_from_disk(output / "dataset")
    assert dataset.column_names == ["id", "position", "image", "panoptic", "segments_info"]
    assert dataset["id"] == [path.stem for path in paths] and dataset["image"] == [str(path) for path in paths]
    for row in dataset:
        np.testing.assert_array_equal(np.asarray(row["panoptic"]), np.asarray(Image.open(output / f"{row['id']}_panoptic.png")))
        segments = json.loads((output / f"{row['id']}.json").read_text())["segments_info"]
        assert row["segments_info"] == [{**segment, "category_id": segment["category_id"] - 1} for segment in segments]
    assert sum(len(segments) for segments in dataset["segments_info"]) > 0
    assert segmentation_metadata(dataset)[0] == ["cat", "sofa", "wall"] and panoptic_thing_class_ids(dataset) == [0, 1]
    card = (output / "dataset-parquet" / "README.md").read_text()
    assert "| 2 | `wall` | stuff |" in card and "`segments_info` (per segment" in card

    # the image sources are paths here, which the processor reads: maft evaluate takes the dataset as it is, and
    # finds the model's own segmentation again
    capsys.readouterr()
    assert main(["evaluate", "--task", "panoptic", "--threshold", "0.1", "--dataset", str(output / "dataset"),
                 "--model", str(model), "--dtype", "float32", "--output", str(tmp_path / "results.json")]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["PQ"] == pytest.approx(100.0)

    assert segment(model, [str(folder)], output, "--task", "instance", "--threshold", "0.1", "--output-format", "dataset") == 1
    assert "(task 'panoptic' there, 'instance' now; stuff ['wall'] there, [] now)" in capsys.readouterr().err


def test_the_instance_dataset_output_holds_the_instances_and_their_masks(collection, tmp_path):
    from datasets import load_from_disk

    model, folder, paths = collection
    output = tmp_path / "out"
    assert segment(model, [str(folder)], output, "--task", "instance", "--threshold", "0.1", "--output-format", "dataset") == 0

    dataset = load_from_disk(output / "dataset")
    assert dataset.column_names == ["id", "position", "image", "instances", "instance_masks"]
    assert dataset["id"] == [path.stem for path in paths]
    for row in dataset:
        instances = json.loads((output / f"{row['id']}.json").read_text())["instances"]
        assert row["instances"] == [{"id": instance["id"], "category_id": instance["category_id"] - 1, "score": instance["score"],
                                     "area": instance["area"], "bbox": instance["bbox"]} for instance in instances]
        assert len(row["instance_masks"]) == len(instances)
        for mask, instance in zip(row["instance_masks"], instances):
            np.testing.assert_array_equal(np.asarray(mask), np.asarray(Image.open(output / instance["mask"])))
    assert sum(len(instances) for instances in dataset["instances"]) > 0
    assert "`instance_masks` (one PNG per instance" in (output / "dataset-parquet" / "README.md").read_text()


def test_a_failing_hub_leaves_the_local_dataset_complete(collection, tmp_path, hub_server, capsys):
    from datasets import load_from_disk

    model, folder, paths = collection
    hub_server.stop()
    assert segment(model, [str(folder)], tmp_path, "--output-format", "dataset", "--push-to-hub", "user/segmentations") == 1
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith(f"maft segment: pushing to user/segmentations failed, the dataset is complete in {tmp_path}: "), message
    assert message.endswith("Connection refused")
    assert len(load_from_disk(tmp_path / "dataset")) == len(paths)
    assert not list(tmp_path.glob(".maft-dataset-parts")) and not list(tmp_path.glob(".dataset*.partial"))


def test_the_summary_lists_failures_with_their_reasons(collection, tmp_path, capsys):
    model, _, paths = collection
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert segment(model, [str(paths[0]), str(broken), str(tmp_path / "missing.png")], tmp_path / "out") == 1
    captured = capsys.readouterr()
    assert "segmented 1 of 3 images" in captured.out and "(0 already complete, 2 failed)" in captured.out
    assert f"  failed: {broken}: " in captured.out and f"skipped {tmp_path / 'missing.png'}" in captured.err
    failures = json.loads((tmp_path / "out" / "maft-failures.json").read_text())["failed"]
    assert [failure["image"] for failure in failures] == [str(broken), str(tmp_path / "missing.png")]


CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\nflags\t\t: fpu\n"


@pytest.mark.parametrize("extra, expected", [("avx512f avx512_bf16", "bfloat16"), ("amx_tile amx_bf16", "bfloat16"),
                                             ("avx512f avx512_vnni", "float32"), ("", "float32")])
def test_dtype_auto_chooses_bfloat16_where_the_cpu_computes_it_natively(tmp_path, extra, expected):
    from maft.utils.precision import choose_dtype, cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=extra))
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", *extra.split()}
    assert choose_dtype("cpu", cpuinfo=cpuinfo).name == expected
    assert choose_dtype("cpu", parameters=200_000_000, cpuinfo=cpuinfo).name == expected
    assert choose_dtype("cpu", parameters=1_400_000, cpuinfo=cpuinfo).name == "float32"  # too small to gain
    assert cpu_flags(tmp_path / "no-such-file") == set()


@pytest.mark.parametrize("supported, expected", [(True, "bfloat16"), (False, "float32")])
def test_dtype_auto_on_cuda_asks_torch(monkeypatch, supported, expected):
    from maft.utils.precision import choose_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported and not including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert choose_dtype("cuda").name == expected
    assert choose_dtype("mps").name == "float32"


def test_segment_says_which_dtype_auto_chose(collection, tmp_path, monkeypatch, capsys):
    from maft.utils import precision

    model, _, paths = collection
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=""))
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert main(["segment", str(paths[0]), "--labels", LABELS, "--model", str(model), "--output", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    assert "dtype auto: float32 on cpu, as the CPU has no native bfloat16 (amx_bf16 or avx512_bf16)\n" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "maft-manifest.json").read_text())["dtype"] == "float32"

    cpuinfo.write_text(CPUINFO.format(extra="amx_bf16"))
    assert main(["segment", str(paths[0]), "--labels", LABELS, "--model", str(model), "--output", str(tmp_path / "small"),
                 "--device", "cpu"]) == 0
    assert "dtype auto: float32 on cpu, as the model is small (1.8M parameters)" in capsys.readouterr().out
    monkeypatch.setattr(precision, "SMALL_MODEL_PARAMETERS", 1000)
    assert main(["segment", str(paths[0]), "--labels", LABELS, "--model", str(model), "--output", str(tmp_path / "bf16"),
                 "--device", "cpu"]) == 0
    assert "dtype auto: bfloat16 on cpu, as the CPU computes bfloat16 natively (amx_bf16)" in capsys.readouterr().out
    assert json.loads((tmp_path / "bf16" / "maft-manifest.json").read_text())["dtype"] == "bfloat16"

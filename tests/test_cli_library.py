"""The library functions the command line stands on: output names and all-or-nothing writes, model folder checks,
devices, dataset vocabularies; and what the command line says when interrupted."""

import json

import pytest
import torch

from maft import cli
from maft.cli.dataset_resolution import load_dataset_and_classes, recorded_classes
from maft.utils.hub import is_hub_id
from maft.cli.model_loading import check_model_folder, resolve_device
from maft.utils.output_files import check_output_folder, distinct_output_names, write_files_atomically


def test_images_that_share_a_name_get_their_position_and_no_two_outputs_collide():
    assert distinct_output_names(["a/photo.png", "b/photo.jpg", "street.png", "c/Street.png"]) == [
        "photo-1", "photo-2", "street-3", "Street-4"
    ]
    # a suffixed name can meet another image's own name: suffixed again, until all differ
    names = distinct_output_names(["a/x.png", "b/x.png", "x-2.png"])
    assert names == ["x-1", "x-2-2", "x-2-3"]
    assert distinct_output_names(["one.png", "two.png"]) == ["one", "two"]


def test_a_set_of_files_is_written_all_or_nothing(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("the previous run")

    def fail(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_files_atomically({first: lambda path: path.write_text("new"), second: fail})
    assert first.read_text() == "the previous run" and not second.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt"]  # no temporary file left

    second.mkdir()
    with pytest.raises(IsADirectoryError, match="b.txt: a folder of that name is in the way"):
        write_files_atomically({first: lambda path: path.write_text("new"), second: lambda path: path.write_text("new")})
    assert first.read_text() == "the previous run"

    second.rmdir()
    write_files_atomically({first: lambda path: path.write_text("new"), second: lambda path: path.write_text("new too")})
    assert (first.read_text(), second.read_text()) == ("new", "new too")


def test_an_output_folder_is_checked_without_creating_it(tmp_path):
    check_output_folder(tmp_path / "new" / "folder")
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file is a file"):
        check_output_folder(tmp_path / "file" / "run")


def test_a_model_folder_is_checked_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="it has no config.json"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json is corrupt: it holds a list"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "maft"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        check_model_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="model.safetensors is incomplete or corrupt"):
        check_model_folder(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file, not a model folder"):
        check_model_folder(tmp_path / "config.json")


def test_devices_are_any_torch_device_string_checked_to_be_usable():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="the device 'cuda:1' is not available here"):
            resolve_device("cuda:1")


def test_hub_ids_are_told_from_paths():
    assert is_hub_id("org/model") and is_hub_id("model")
    assert not any(is_hub_id(path) for path in ("./model", "/data/model", "a/b/c"))


def test_a_vocabulary_comes_from_the_arguments_else_from_the_dataset():
    from datasets import Dataset

    from maft.data.segmentation_data import with_segmentation_metadata

    plain = Dataset.from_dict({"image": [0], "label": [0]})
    with pytest.raises(ValueError, match="does not record its class names"):
        recorded_classes(plain)
    assert recorded_classes(plain, ["cat"]) == (["cat"], 255)
    recorded = with_segmentation_metadata(Dataset.from_dict({"image": [0], "label": [0]}), ["sky", "sea"], 65535)
    assert recorded_classes(recorded) == (["sky", "sea"], 65535)
    assert recorded_classes(recorded, ["cat"], ignore_index=0) == (["sky", "sea"], 0)
    with pytest.raises(ValueError, match="either a dataset"):
        load_dataset_and_classes("data", benchmark="ade20k_150")


def test_an_interrupted_command_says_so_in_one_line(monkeypatch, capsys):
    def interrupted(arguments):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "segment", interrupted)
    assert cli.main(["segment", "image.png", "--labels", "cat"]) == 130
    assert capsys.readouterr().err == "maft segment: interrupted\n"

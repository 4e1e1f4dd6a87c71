"""push_to_hub and from_pretrained through a local Hub server (tests/hub_server.py)."""

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

from maft import MaftModel, MaftProcessor
from helpers import random_image, tiny_model, tiny_processor


def test_upload_and_download_files(hub_server, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 10)
    api = HfApi()
    api.create_repo("user/files")
    api.upload_folder(folder_path=folder, repo_id="user/files")
    assert hub_server.files("user/files")["weights.bin"] == bytes(range(256)) * 10
    assert open(hf_hub_download("user/files", "notes.txt"), encoding="utf-8").read() == "hello"
    snapshot = snapshot_download("user/files")
    assert open(f"{snapshot}/weights.bin", "rb").read() == bytes(range(256)) * 10
    (folder / "notes.txt").write_text("updated")
    api.upload_folder(folder_path=folder, repo_id="user/files")
    assert open(hf_hub_download("user/files", "notes.txt"), encoding="utf-8").read() == "updated"
    assert len(hub_server.repositories["user/files"].commits) == 3  # creation and two uploads


def test_push_to_hub_then_from_pretrained_round_trips(hub_server):
    model, processor = tiny_model(), tiny_processor()
    model.push_to_hub("user/maft-tiny")
    processor.push_to_hub("user/maft-tiny")
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= set(hub_server.files("user/maft-tiny"))
    loaded = MaftModel.from_pretrained("user/maft-tiny").eval()
    loaded_processor = MaftProcessor.from_pretrained("user/maft-tiny")
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(expected, actual), name
    inputs = loaded_processor(images=random_image(64, 64), text=["cat", "dog"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).class_queries_logits, model(**inputs).class_queries_logits, rtol=0, atol=0)


def test_a_stopped_hub_fails_fast_with_a_connection_error(hub_server, tmp_path):
    api = HfApi()
    api.create_repo("user/gone")
    hub_server.stop()
    # huggingface_hub's HTTP client (httpx, vendored under another name in some versions) raises its ConnectError.
    with pytest.raises(Exception, match="Connection refused") as raised:
        api.create_repo("user/another")
    assert type(raised.value).__name__ == "ConnectError"

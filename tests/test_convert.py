"""Converting original checkpoints: a full-size fake from the released key list, safe loading, the command line."""

import json
import pickle

import pytest
import torch

from golden import require_golden
from maft import MaftConfig, MaftModel, MaftProcessor
from maft.cli import main
from maft.convert_original_checkpoint import config_from_state_dict, convert_state_dict, load_original_checkpoint


def released_key_list() -> dict[str, list[int]]:
    return json.loads((require_golden().parent / "maft_vitb16_checkpoint_keys.json").read_text())["keys"]


def test_a_full_size_checkpoint_converts_strictly_into_the_default_config(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        name: torch.randn(shape, generator=generator).half() if "running_var" not in name else torch.ones(shape).half()
        for name, shape in released_key_list().items()
    }
    assert config_from_state_dict(state_dict).to_dict() == MaftConfig().to_dict()
    path = tmp_path / "MAFT_Vitb.pt"
    torch.save({"model": state_dict, "iteration": 1000}, path)  # as detectron2 saves
    assert main(["convert", "--checkpoint", str(path), "--output-dir", str(tmp_path / "converted")]) == 0
    model = MaftModel.from_pretrained(tmp_path / "converted")
    torch.testing.assert_close(model.no_object_embedding, state_dict["clip_adapter.non_object_embedding"].float())
    torch.testing.assert_close(
        model.ip_clip.visual_projection.weight, state_dict["IPCLIP.proj"].float().t()
    )  # IP-CLIP from the fine-tuned tower, not the frozen one
    torch.testing.assert_close(
        model.distillation_teacher.visual_projection.weight, state_dict["clip_adapter.clip_model.visual.proj"].float().t()
    )
    processor = MaftProcessor.from_pretrained(tmp_path / "converted")
    assert processor.tokenizer("a photo of a cat.")["input_ids"][:3] == [49406, 320, 1125]


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_pickle_with_an_unexpected_global_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as file:
        pickle.dump({"model": {"x": torch.zeros(1)}, "payload": Payload()}, file)
    with pytest.raises(ValueError, match="pickled objects that a checkpoint of weights does not need"):
        load_original_checkpoint(path)


def test_a_freeseg_checkpoint_converts_with_ip_clip_from_the_frozen_clip():
    keys = json.loads((require_golden().parent / "freeseg_checkpoint_keys.json").read_text())["keys"]
    state_dict = {name: torch.empty(shape, device="meta") for name, shape in keys.items()}
    config = config_from_state_dict(state_dict)
    assert config.to_dict() == MaftConfig().to_dict()
    converted = convert_state_dict(state_dict)
    with torch.device("meta"):
        model = MaftModel(config)
    assert {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()} == {
        name: tuple(tensor.shape) for name, tensor in converted.items()
    }
    assert converted["ip_clip.visual_projection.weight"].shape == (512, 768)

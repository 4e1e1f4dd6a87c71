"""Converting original checkpoints: full-size fakes from the released key list (ViT-B/16, ViT-L/14, FreeSeg), safe
loading, errors listed by module, the command line with its model card and its push to a (local) Hub."""

import pickle
import re

import pytest
import torch
from huggingface_hub import ModelCard

from golden import golden_config, golden_state_dict, released_key_list
from helpers import assert_carries_remote_code
from maft import MaftConfig, MaftModel, MaftProcessor
from maft.cli import main
from maft.conversion.convert_original_maft_checkpoint import (
    config_from_state_dict,
    convert_original_checkpoint,
    convert_state_dict,
    load_original_checkpoint,
)


def test_a_full_size_checkpoint_converts_strictly_into_the_default_config(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        name: torch.randn(shape, generator=generator).half() if "running_var" not in name else torch.ones(shape).half()
        for name, shape in released_key_list("maft_vitb16").items()
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
    assert not any("teacher" in name for name in model.state_dict())  # the frozen tower is only training's teacher
    processor = MaftProcessor.from_pretrained(tmp_path / "converted")
    assert processor.tokenizer("a photo of a cat.")["input_ids"][:3] == [49406, 320, 1125]


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_pickle_with_an_unexpected_global_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as file:
        pickle.dump({"model": {"x": torch.zeros(1)}, "payload": Payload()}, file, protocol=2)  # as torch.save writes
    with pytest.raises(ValueError, match="pickled objects that a checkpoint of weights does not need"):
        load_original_checkpoint(path)


def test_a_truncated_or_foreign_file_is_refused_naming_it(tmp_path):
    torch.save({"model": {"x": torch.zeros(1000)}}, tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:300])
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for name in ("cut.pth", "notes.txt"):
        with pytest.raises(ValueError, match=f"cannot read .*{name}: it is empty, truncated or not a PyTorch checkpoint"):
            load_original_checkpoint(tmp_path / name)


def test_a_string_where_a_tensor_should_be_is_named_with_its_file(tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"x": torch.zeros(1), "clip_adapter.non_object_embedding": "none"}}, path)
    with pytest.raises(ValueError, match=r"model_final.pth: the entry 'clip_adapter.non_object_embedding' holds a str \('none'\)"):
        load_original_checkpoint(path)
    with pytest.raises(ValueError, match="the state dict: the entry 'clip_adapter.non_object_embedding' holds a str"):
        convert_original_checkpoint({"x": torch.zeros(1), "clip_adapter.non_object_embedding": "none"})


def test_a_freeseg_checkpoint_converts_with_ip_clip_from_the_frozen_clip():
    keys = released_key_list("freeseg")
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


IMAGE_TOWERS = ("IPCLIP.", "T.", "clip_adapter.clip_model.visual.")
TEXT_TOWER = "clip_adapter.clip_model."
# Entries of the proposal generator sized by CLIP's embedding (projection) dimension, 512 -> 768 for ViT-L/14.
EMBEDDING_SIZED = (
    "clip_adapter.non_object_embedding",
    "sem_seg_head.interaction.layer_norm_k_1.",
    "sem_seg_head.interaction.attn.k_proj.weight",
    "sem_seg_head.interaction.attn.v_proj.weight",
    "sem_seg_head.predictor.class_embed.layers.1.",
)


def vit_large_patch14_key_list() -> dict[str, list[int]]:
    """The released MAFT ViT-L/14 checkpoint's names and shapes, from the ViT-B/16 ones by CLIP ViT-L/14's sizes:
    image towers width 768 -> 1024 (heads 12 -> 16, MLP 3072 -> 4096), 12 -> 24 layers, patch 16 -> 14 at 224 pixels
    (positional rows 14^2+1 = 197 -> 16^2+1 = 257); text tower width 512 -> 768 (MLP 2048 -> 3072), still 12 layers;
    embedding dimension 512 -> 768. The proposal generator's own sizes do not change."""
    image_sizes = {768: 1024, 2304: 3 * 1024, 3072: 4 * 1024, 197: (224 // 14) ** 2 + 1, 512: 768}
    text_sizes = {512: 768, 1536: 3 * 768, 2048: 4 * 768}
    keys = {}
    for name, shape in released_key_list("maft_vitb16").items():
        if name.startswith(IMAGE_TOWERS):
            shape = [image_sizes.get(size, size) for size in shape]
            if name.endswith("conv1.weight"):
                shape = shape[:2] + [14, 14]
            if match := re.match(r"(.*transformer\.resblocks\.)(\d+)(\..*)", name):
                for layer in (int(match[2]), int(match[2]) + 12):
                    keys[f"{match[1]}{layer}{match[3]}"] = shape
                continue
        elif name.startswith(TEXT_TOWER):
            shape = [text_sizes.get(size, size) for size in shape]
        elif name.startswith(EMBEDDING_SIZED):
            shape = [768 if size == 512 else size for size in shape]
        keys[name] = shape
    return keys


def test_the_vit_large_patch14_checkpoint_converts_into_the_vit_large_patch14_config():
    keys = vit_large_patch14_key_list()
    assert keys["IPCLIP.conv1.weight"] == [1024, 3, 14, 14] and keys["IPCLIP.positional_embedding"] == [257, 1024]
    assert keys["IPCLIP.transformer.resblocks.23.attn.in_proj_weight"] == [3072, 1024]
    assert keys["clip_adapter.clip_model.text_projection"] == [768, 768]
    state_dict = {name: torch.empty(shape, device="meta") for name, shape in keys.items()}
    config = config_from_state_dict(state_dict)
    expected = MaftConfig.vit_large_patch14()
    assert config.to_dict() == expected.to_dict()
    assert (config.vision_config.num_attention_heads, config.vision_config.mask_start_layer) == (16, 16)
    assert (config.vision_config.image_size, config.text_config.num_attention_heads) == (224, 12)
    converted = convert_state_dict(state_dict)
    with torch.device("meta"):
        model = MaftModel(expected)
    assert {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()} == {
        name: tuple(tensor.shape) for name, tensor in converted.items()
    }
    assert converted["ip_clip.encoder.layers.23.self_attn.q_proj.weight"].shape == (1024, 1024)
    assert converted["text_encoder.text_projection.weight"].shape == (768, 768)
    assert converted["no_object_embedding"].shape == (1, 768)


def test_the_start_layer_of_the_original_yaml_wins_over_the_published_one():
    state_dict = {name: torch.empty(shape, device="meta") for name, shape in vit_large_patch14_key_list().items()}
    config = config_from_state_dict(state_dict, "MODEL:\n  START_LAYERS: 12\n")
    assert config.vision_config.mask_start_layer == 12


def golden_checkpoint(tmp_path, state_dict=None):
    """The golden (small, original-layout) state dict saved as detectron2 does, and its YAML config, as files."""
    path, config_path = tmp_path / "model_final.pth", tmp_path / "config.yaml"
    torch.save({"model": dict(golden_state_dict()) if state_dict is None else state_dict, "iteration": 10}, path)
    config_path.write_text(golden_config()["config"])
    return path, config_path


def test_convert_push_to_hub_gives_the_same_model_as_the_local_folder(hub_server, tmp_path, capsys):
    checkpoint, yaml_path = golden_checkpoint(tmp_path)
    output = tmp_path / "converted"
    arguments = ["convert", "--checkpoint", str(checkpoint), "--original-config", str(yaml_path), "--output-dir", str(output)]
    assert main([*arguments, "--push-to-hub", "maft-org/maft-golden"]) == 0
    assert f"pushed to {hub_server.endpoint}/maft-org/maft-golden" in capsys.readouterr().out
    files = hub_server.files("maft-org/maft-golden")
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"} <= set(files)
    assert len(hub_server.repositories["maft-org/maft-golden"].commits) == 2  # creation, then one upload of the folder
    assert all(files[path.name] == path.read_bytes() for path in output.iterdir())  # the folder, file for file
    assert_carries_remote_code(files)

    local, pushed = MaftModel.from_pretrained(output), MaftModel.from_pretrained("maft-org/maft-golden")
    assert pushed.config.to_diff_dict() | {"_name_or_path": ""} == local.config.to_diff_dict() | {"_name_or_path": ""}
    local_weights, pushed_weights = local.state_dict(), pushed.state_dict()
    assert local_weights.keys() == pushed_weights.keys()
    for name, tensor in local_weights.items():
        assert torch.equal(tensor, pushed_weights[name]), name
    torch.testing.assert_close(pushed.no_object_embedding, golden_state_dict()["clip_adapter.non_object_embedding"])
    local_processor, pushed_processor = MaftProcessor.from_pretrained(output), MaftProcessor.from_pretrained("maft-org/maft-golden")
    assert pushed_processor.to_dict() == local_processor.to_dict()
    assert pushed_processor.tokenizer("a photo of a cat.")["input_ids"] == local_processor.tokenizer("a photo of a cat.")["input_ids"]

    # A second conversion into the same repository is one more commit, not an error.
    assert main([*arguments, "--push-to-hub", "maft-org/maft-golden"]) == 0
    assert len(hub_server.repositories["maft-org/maft-golden"].commits) == 3
    assert not hub_server.repositories["maft-org/maft-golden"].private
    assert main([*arguments, "--push-to-hub", "maft-org/maft-golden-private", "--private"]) == 0
    assert hub_server.repositories["maft-org/maft-golden-private"].private


def test_the_converted_folder_has_a_model_card(tmp_path):
    checkpoint, yaml_path = golden_checkpoint(tmp_path)
    output = tmp_path / "maft-golden"
    arguments = ["convert", "--checkpoint", str(checkpoint), "--original-config", str(yaml_path), "--output-dir", str(output)]
    assert main(arguments) == 0
    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert card.data.model_name == "maft-golden" and "custom_code" in card.data.tags
    assert "model_final.pth" in card.text and 'model_id = "maft-golden"' in card.text
    # A curated card (as in model_cards/) replaces the generated one.
    curated = tmp_path / "card.md"
    curated.write_text("---\nlibrary_name: maft\nlicense: unknown\n---\n\n# curated\n")
    assert main([*arguments, "--model-card", str(curated)]) == 0
    assert ModelCard.load(output / "README.md").text.strip() == "# curated"


def meta_vit_b16_state_dict() -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in released_key_list("maft_vitb16").items()}


def test_an_unknown_key_inside_a_clip_tower_is_listed_by_module():
    state_dict = meta_vit_b16_state_dict()
    state_dict["IPCLIP.transformer.resblocks.3.attn.extra_bias"] = torch.empty(768, device="meta")
    state_dict["clip_adapter.clip_model.prompt_learner.ctx"] = torch.empty(16, 512, device="meta")
    with pytest.raises(ValueError, match="2 entries this converter does not know") as raised:
        convert_state_dict(state_dict)
    message = str(raised.value)
    assert "IPCLIP.transformer.resblocks: 1 keys, IPCLIP.transformer.resblocks.3.attn.extra_bias" in message
    assert "clip_adapter.clip_model.prompt_learner: 1 keys, clip_adapter.clip_model.prompt_learner.ctx" in message


def test_missing_keys_of_a_clip_tower_are_listed_by_module():
    state_dict = meta_vit_b16_state_dict()
    missing = ["IPCLIP.transformer.resblocks.5.ln_2.bias", "IPCLIP.ln_post.bias", "clip_adapter.clip_model.ln_final.bias"]
    missing += [name for name in state_dict if name.startswith("clip_adapter.clip_model.visual.transformer.resblocks.11.mlp.")]
    for name in missing:
        del state_dict[name]
    with pytest.raises(ValueError, match=f"{len(missing)} entries of its CLIP towers missing") as raised:
        convert_state_dict(state_dict)
    message = str(raised.value)
    assert "IPCLIP.transformer.resblocks: 1 keys, IPCLIP.transformer.resblocks.5.ln_2.bias" in message
    assert "IPCLIP.ln_post: 1 keys, IPCLIP.ln_post.bias" in message and "clip_adapter.clip_model.ln_final: 1 keys" in message
    assert "clip_adapter.clip_model.visual: 4 keys, e.g. clip_adapter.clip_model.visual.transformer.resblocks.11.mlp." in message
    assert "does not know" not in message


def test_missing_and_extra_proposal_generator_keys_are_listed_by_module(tmp_path, capsys):
    state_dict = {
        name: tensor for name, tensor in golden_state_dict().items()
        if not name.startswith("sem_seg_head.predictor.transformer_ffn_layers.1.")
    }
    state_dict["sem_seg_head.predictor.transformer_ffn_layers.7.norm.weight"] = torch.zeros(32)
    with pytest.raises(ValueError, match="does not fit the config") as raised:
        convert_original_checkpoint(state_dict, golden_config()["config"])
    message = str(raised.value)
    assert "missing 6 entries" in message and "missing decoder.layers.1: 6 keys, e.g. decoder.layers.1.ffn_norm.bias" in message
    assert "unexpected decoder.layers.7: 1 keys, decoder.layers.7.ffn_norm.weight" in message
    # The command line reports it without a traceback.
    checkpoint, yaml_path = golden_checkpoint(tmp_path, state_dict)
    arguments = ["convert", "--checkpoint", str(checkpoint), "--original-config", str(yaml_path), "--output-dir", str(tmp_path / "out")]
    assert main(arguments) == 1
    assert "missing decoder.layers.1: 6 keys" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_an_entry_the_config_needs_fails_naming_it():
    state_dict = {name: tensor for name, tensor in meta_vit_b16_state_dict().items() if name != "sem_seg_head.predictor.query_feat.weight"}
    with pytest.raises(ValueError, match=r"has no sem_seg_head\.predictor\.query_feat\.weight, one of the entries the configuration"):
        config_from_state_dict(state_dict)

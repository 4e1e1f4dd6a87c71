"""Training with the Accelerate loop on a tiny model and synthetic data."""


import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from helpers import CLASS_NAMES, assert_carries_remote_code, random_image, save_training_inputs, synthetic_dataset, tiny_config, tiny_model, tiny_processor
from maft import MaftModel
from maft.training import (
    MASK_AWARE_FINE_TUNING_RECIPE,
    PROPOSAL_GENERATOR_RECIPE,
    MaftTrainer,
    MaftTrainingArguments,
    MaftTrainingCollator,
    complete_checkpoints,
    get_recipe,
    train,
    trainer_arguments,
)
from maft.training import loop as train_module
from maft.training.checkpoints import checkpoint_problem
from maft.training.augmentation import AugmentationConfig
from maft.training.collator import EpochIndexedDataset


SMALL_CROPS = AugmentationConfig(short_sides=(64, 96), crop_size=64)


def run(tmp_path, model=None, augmentation=None, resume=False, push_to_hub=False, recipe=MASK_AWARE_FINE_TUNING_RECIPE,
        **run_settings):
    recipe = recipe.replace(batch_size=run_settings.pop("batch_size", 2), max_steps=run_settings.pop("max_steps", 4),
                                                   learning_rate=1e-3)
    arguments = MaftTrainingArguments(output_dir=str(tmp_path), recipe=recipe, resume=resume, push_to_hub=push_to_hub,
                                      **{"save_steps": 2, **run_settings})
    processor = tiny_processor()
    model = model or tiny_model()
    collator = MaftTrainingCollator(processor, augmentation=augmentation, seed=recipe.seed)
    return train(model, processor, synthetic_dataset(), collator, CLASS_NAMES, arguments)


def interrupted_then_resumed(tmp_path, monkeypatch, **overrides) -> MaftModel:
    """`run`, stopped right after its first checkpoint, then resumed from it."""
    save = train_module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, **overrides)
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    assert len(complete_checkpoints(tmp_path)) == 1
    return run(tmp_path, resume=True, **overrides)


def assert_same_weights(actual: MaftModel, expected: MaftModel) -> None:
    for (name, expected_tensor), (_, actual_tensor) in zip(expected.state_dict().items(), actual.state_dict().items()):
        torch.testing.assert_close(actual_tensor, expected_tensor, rtol=0, atol=1e-6, msg=name)


def stage_two_loss_and_batch(model, processor):
    recipe = MASK_AWARE_FINE_TUNING_RECIPE
    recipe.apply_to(model)
    stage_loss = recipe.training_loss(model)
    with torch.no_grad():
        text_embeds = model.get_text_embeddings(**processor.tokenize_class_names(CLASS_NAMES))
    return stage_loss, MaftTrainingCollator(processor)(synthetic_dataset(2)), text_embeds


def test_loss_falls_and_exactly_the_recipe_changes(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    stage_loss, batch, text_embeds = stage_two_loss_and_batch(model, processor)
    with torch.no_grad():
        initial_loss = sum(stage_loss(model, batch, text_embeds).values()).item()
    recipe = MASK_AWARE_FINE_TUNING_RECIPE.replace(batch_size=2, max_steps=25, learning_rate=3e-3, gradient_clip_norm=1.0)
    trained = train(model, processor, synthetic_dataset(2), MaftTrainingCollator(processor), CLASS_NAMES,
                    MaftTrainingArguments(output_dir=str(tmp_path), recipe=recipe, save_steps=25))
    trained.eval()
    with torch.no_grad():
        final_loss = sum(stage_loss(trained, batch, text_embeds).values()).item()
    assert final_loss < 0.7 * initial_loss
    trainable = {name for name, _ in tiny_model().named_parameters() if recipe.is_trainable(name)}
    changed = {name for name, tensor in trained.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and changed <= trainable
    assert any(".self_attn." in name for name in changed) and "ip_clip.post_layernorm.weight" in changed


def test_stage_two_gradients_reach_exactly_the_recipe_and_the_frozen_parts_stay_in_eval_mode():
    model, processor = tiny_model(), tiny_processor()
    stage_loss, batch, text_embeds = stage_two_loss_and_batch(model, processor)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith("ip_clip.") for name in trainable) and not any(".mlp." in name for name in trainable)
    MASK_AWARE_FINE_TUNING_RECIPE.set_training_modes(model)
    assert not model.decoder.training and not model.pixel_decoder.training and model.ip_clip.training
    assert not stage_loss.teacher.training and not any(parameter.requires_grad for parameter in stage_loss.teacher.parameters())
    losses = stage_loss(model, batch, text_embeds)
    assert set(losses) == {"mask_aware_loss", "distillation_loss"}
    sum(losses.values()).backward()
    assert {name for name, parameter in model.named_parameters() if parameter.grad is not None} == trainable


def test_the_teacher_is_the_starting_tower_and_stays_so(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    stage_loss = MASK_AWARE_FINE_TUNING_RECIPE.training_loss(model)
    start = {name: tensor.clone() for name, tensor in model.ip_clip.state_dict().items()}
    model.ip_clip.post_layernorm.weight.data.add_(1.0)
    assert all(torch.equal(stage_loss.teacher.state_dict()[name], tensor) for name, tensor in start.items())


@pytest.mark.parametrize("recipe", [PROPOSAL_GENERATOR_RECIPE, MASK_AWARE_FINE_TUNING_RECIPE], ids=lambda recipe: recipe.stage)
def test_weight_decay_follows_the_module_type_parameter_by_parameter(recipe):
    model = tiny_model()
    recipe.apply_to(model)
    decay_of = {id(parameter): group["weight_decay"] for group in recipe.parameter_groups(model) for parameter in group["params"]}
    lr_of = {id(parameter): group["lr"] for group in recipe.parameter_groups(model) for parameter in group["params"]}
    owners = {name: module for module_name, module in model.named_modules()
              for name in (f"{module_name}.{local}".lstrip(".") for local, _ in module.named_parameters(recurse=False))}
    checked = 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert id(parameter) not in decay_of, name
            continue
        owner = owners[name]
        no_decay = isinstance(owner, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding))
        assert decay_of[id(parameter)] == (0.0 if no_decay else recipe.weight_decay), name
        assert lr_of[id(parameter)] == pytest.approx(recipe.learning_rate * (0.1 if name.startswith("backbone.") else 1.0)), name
        checked += 1
    assert checked == len(decay_of)
    named = dict(model.named_parameters())
    if recipe.stage == "proposals":  # biases, the class/mask heads, level embedding parameter: decayed; nn.Embedding: not
        for name in ("decoder.class_embed.layers.0.bias", "decoder.mask_embed.layers.0.weight", "pixel_decoder.level_embed",
                     "no_object_embedding", "context_interaction.layer_scale"):
            assert decay_of[id(named[name])] == recipe.weight_decay, name
        for name in ("decoder.query_features.weight", "decoder.level_embed.weight", "decoder.decoder_norm.bias"):
            assert decay_of[id(named[name])] == 0.0, name
    else:
        assert decay_of[id(named["ip_clip.encoder.layers.0.self_attn.q_proj.bias"])] == recipe.weight_decay
        assert decay_of[id(named["ip_clip.encoder.layers.0.layer_norm1.weight"])] == 0.0


def test_resume_after_an_interruption_equals_a_straight_run(tmp_path, monkeypatch):
    straight = run(tmp_path / "straight")
    resumed = interrupted_then_resumed(tmp_path / "resumed", monkeypatch)
    assert_same_weights(resumed, straight)
    assert [path.name for path in complete_checkpoints(tmp_path / "resumed")] == ["checkpoint-2", "checkpoint-4"]
    loaded = MaftModel.from_pretrained(tmp_path / "resumed" / "checkpoint-4" / "model")
    torch.testing.assert_close(loaded.ip_clip.post_layernorm.weight, resumed.ip_clip.post_layernorm.weight)


def test_stage_one_resume_with_dropout_equals_a_straight_run(tmp_path, monkeypatch):
    # dropout in the pixel decoder and the context interaction: the global RNG must be where the straight run had it
    assert tiny_config().encoder_dropout > 0 and tiny_config().context_dropout > 0
    overrides = {"recipe": PROPOSAL_GENERATOR_RECIPE, "batch_size": 1, "max_steps": 4, "save_steps": 2}
    straight = run(tmp_path / "straight", **overrides)
    resumed = interrupted_then_resumed(tmp_path / "resumed", monkeypatch, **overrides)
    assert [path.name for path in complete_checkpoints(tmp_path / "resumed")] == ["checkpoint-2", "checkpoint-4"]
    assert_same_weights(resumed, straight)
    assert not torch.equal(straight.decoder.class_embed.layers[0].weight, tiny_model().decoder.class_embed.layers[0].weight)


def test_resume_with_augmentation_equals_a_straight_run(tmp_path, monkeypatch):
    # batches of 1: the run stops in the middle of epoch 0 (after 3 of its 4 batches), and resumed goes on into epoch 1
    overrides = {"augmentation": SMALL_CROPS, "batch_size": 1, "max_steps": 6, "save_steps": 3}
    straight = run(tmp_path / "straight", **overrides)
    resumed = interrupted_then_resumed(tmp_path / "resumed", monkeypatch, **overrides)
    assert [path.name for path in complete_checkpoints(tmp_path / "resumed")] == ["checkpoint-3", "checkpoint-6"]
    assert_same_weights(resumed, straight)


def test_an_example_is_augmented_by_its_seed_epoch_and_index_alone():
    collator = MaftTrainingCollator(tiny_processor(), augmentation=SMALL_CROPS)
    dataset = EpochIndexedDataset(synthetic_dataset())
    pair = collator([dataset[0], dataset[1]])["pixel_values"]
    assert torch.equal(collator([dataset[1]])["pixel_values"][0], pair[1])  # whatever the batch, process or call order
    dataset.set_epoch(1)
    assert not torch.equal(collator([dataset[1]])["pixel_values"][0], pair[1])


def test_a_partial_checkpoint_is_never_taken_as_complete(tmp_path):
    (tmp_path / "checkpoint-6.partial").mkdir()
    (tmp_path / "checkpoint-2").mkdir()
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_checkpoints_are_published_to_the_hub_with_a_model_card(tmp_path, hub_server):
    run(tmp_path, push_to_hub=True, hub_model_id="user/maft-trained", base_model="openai/clip-vit-base-patch16",
        dataset_name="user/scenes")
    files = hub_server.files("user/maft-trained")
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.model_name == "user/maft-trained"
    assert_carries_remote_code(files)
    assert card.data.base_model == "openai/clip-vit-base-patch16" and card.data.datasets == ["user/scenes"]
    assert "step 4 of 4" in card.text and "| learning_rate | 0.001 |" in card.text and "| mask_aware_loss |" in card.text
    assert len(hub_server.repositories["user/maft-trained"].commits) == 3  # creation, step 2, step 4
    assert isinstance(MaftModel.from_pretrained("user/maft-trained"), MaftModel)


def test_arguments_and_recipes_are_checked():
    with pytest.raises(ValueError, match="`stage` must be one of proposals, maft"):
        get_recipe("clip")
    with pytest.raises(ValueError, match="needs `hub_model_id`"):
        MaftTrainingArguments(output_dir="x", push_to_hub=True)
    with pytest.raises(ValueError, match="has no learning_rte"):
        MASK_AWARE_FINE_TUNING_RECIPE.replace(learning_rte=1.0)
    with pytest.raises(ValueError, match="`max_steps` must be at least 1"):
        MASK_AWARE_FINE_TUNING_RECIPE.replace(max_steps=0)
    recipe = MaftTrainingArguments(output_dir="x").recipe
    assert (recipe.learning_rate, recipe.weight_decay, recipe.max_steps, recipe.gradient_clip_norm) == (1e-5, 1e-4, 1000, 0.01)
    assert (PROPOSAL_GENERATOR_RECIPE.learning_rate, PROPOSAL_GENERATOR_RECIPE.max_steps) == (1.5e-4, 60000)


def test_transformers_trainer_fine_tunes_stage_two_and_pushes_to_the_hub(tmp_path, hub_server):
    model, processor = tiny_model(), tiny_processor()
    before = model.ip_clip.post_layernorm.weight.clone()
    arguments = trainer_arguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
                                  use_cpu=True, push_to_hub=True, hub_model_id="user/maft-trainer", save_strategy="no")
    assert (arguments.weight_decay, arguments.max_grad_norm, arguments.seed) == (1e-4, 0.01, 123)
    trainer = MaftTrainer(model, arguments, processor=processor, class_names=CLASS_NAMES, train_dataset=synthetic_dataset(),
                          data_collator=MaftTrainingCollator(processor))
    result = trainer.train()
    trainer.push_to_hub()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert not torch.equal(model.ip_clip.post_layernorm.weight, before)
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == {
        name for name, _ in model.named_parameters() if MASK_AWARE_FINE_TUNING_RECIPE.is_trainable(name)}
    files = hub_server.files("user/maft-trainer")
    assert "model.safetensors" in files and "processor_config.json" in files
    assert_carries_remote_code(files)


@pytest.mark.parametrize("stage", ["maft", "proposals"])
def test_accelerate_launch_with_two_processes(tmp_path, stage):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    save_training_inputs(tmp_path)
    accelerate = Path(sys.executable).with_name("accelerate")
    # `--cpu --num_processes 2` starts one process; two CPU processes are "multi_gpu" with ACCELERATE_USE_CPU (gloo)
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "0", "-m", "maft.cli", "train", "--train-dataset", str(tmp_path / "data"),
         "--class-names", ", ".join(CLASS_NAMES), "--init-from", str(tmp_path / "init"), "--output-dir", str(tmp_path / "out"),
         "--stage", stage, "--crop-size", "64", "--max-steps", "2", "--save-steps", "1", "--per-device-batch-size", "1",
         "--learning-rate", "1e-3"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [path.name for path in complete_checkpoints(tmp_path / "out")] == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in complete_checkpoints(tmp_path / "out"):  # both ranks ran and saved their state
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {path.name for path in checkpoint.iterdir()}
        assert checkpoint_problem(checkpoint) is None
    before, after = load_file(tmp_path / "init" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    trained = ("ip_clip.",) if stage == "maft" else ("backbone.", "pixel_decoder.", "context_interaction.", "decoder.", "no_object")
    assert changed and all(name.startswith(trained) for name in changed)


@pytest.mark.parametrize("recipe", [PROPOSAL_GENERATOR_RECIPE, MASK_AWARE_FINE_TUNING_RECIPE], ids=lambda recipe: recipe.stage)
def test_activation_checkpointing_gives_the_same_gradients_and_saves_less_for_backward(recipe):
    processor = tiny_processor()
    batch = MaftTrainingCollator(processor)(synthetic_dataset(2))
    results = []
    for checkpointing in (False, True):
        model = tiny_model(encoder_dropout=0.0, context_dropout=0.0)
        recipe.apply_to(model)
        stage_loss = recipe.training_loss(model)
        with torch.no_grad():
            text_embeds = model.get_text_embeddings(**processor.tokenize_class_names(CLASS_NAMES))
        if checkpointing:
            model.activation_checkpointing_enable()
        recipe.set_training_modes(model)
        saved_bytes = []

        def pack(tensor):
            saved_bytes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = sum(stage_loss(model, batch, text_embeds).values())
        loss.backward()
        results.append(({name: p.grad for name, p in model.named_parameters() if p.grad is not None}, sum(saved_bytes)))
    (plain, plain_bytes), (checkpointed, checkpointed_bytes) = results
    assert plain.keys() == checkpointed.keys() and plain
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-5, atol=1e-7, msg=name)
    assert checkpointed_bytes < 0.9 * plain_bytes

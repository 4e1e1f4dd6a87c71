"""Training with the Accelerate loop on a tiny model and synthetic data."""

import logging

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from maft import MaftModel
from maft.training import MaftTrainingArguments, MaftTrainingCollator, complete_checkpoints, train
from maft.training import loop as train_module
from maft.training.augmentation import AugmentationConfig
from maft.training.collator import EpochIndexedDataset
from test_modeling import random_image, tiny_model, tiny_processor


CLASS_NAMES = ["cat", "dog", "sky"]
SMALL_CROPS = AugmentationConfig(short_sides=(64, 96), crop_size=64)


def synthetic_dataset(size: int = 4) -> list[dict]:
    examples = []
    for index in range(size):
        label = np.full((64, 64), 2, dtype=np.int64)
        label[16:48, : 32 if index % 2 else 64] = index % 2
        label[:4] = 255
        examples.append({"image": random_image(64, 64, seed=index), "label": label})
    return examples


def save_training_inputs(path) -> None:
    """The synthetic dataset (save_to_disk, image and label columns) in `path/data`, a tiny model in `path/init`."""
    from datasets import Dataset, Features, Image as ImageFeature
    from PIL import Image

    examples = synthetic_dataset()
    Dataset.from_dict(
        {"image": [example["image"] for example in examples],
         "label": [Image.fromarray(example["label"].astype(np.uint8)) for example in examples]},
        features=Features({"image": ImageFeature(), "label": ImageFeature()}),
    ).save_to_disk(path / "data")
    tiny_model().save_pretrained(path / "init")
    tiny_processor().save_pretrained(path / "init")


def run(tmp_path, model=None, augmentation=None, **overrides):
    recipe = {"per_device_batch_size": 2, "max_steps": 4, "save_steps": 2, "learning_rate": 1e-3, **overrides}
    arguments = MaftTrainingArguments(output_dir=str(tmp_path), **recipe)
    processor = tiny_processor()
    model = model or tiny_model()
    collator = MaftTrainingCollator(processor, CLASS_NAMES, augmentation=augmentation, seed=arguments.seed)
    return train(model, processor, synthetic_dataset(), collator, arguments)


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


def test_loss_falls_and_exactly_the_recipe_changes(tmp_path):
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    processor = tiny_processor()
    collator = MaftTrainingCollator(processor, CLASS_NAMES)
    batch = collator(synthetic_dataset(2))
    with torch.no_grad():
        initial_loss = model(**batch).loss.item()
    arguments = MaftTrainingArguments(output_dir=str(tmp_path), per_device_batch_size=2, max_steps=25, save_steps=25,
                                      learning_rate=3e-3, gradient_clip_norm=1.0)
    trained = train(model, processor, synthetic_dataset(2), collator, arguments)
    trained.eval()
    with torch.no_grad():
        final_loss = trained(**batch).loss.item()
    assert final_loss < 0.7 * initial_loss
    recipe = {f"ip_clip.{name}" for name in trained.ip_clip.apply_mask_aware_finetuning_recipe()}
    changed = {name for name, tensor in trained.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and changed <= recipe
    assert any(".self_attn." in name for name in changed) and "ip_clip.post_layernorm.weight" in changed


def test_resume_after_an_interruption_equals_a_straight_run(tmp_path, monkeypatch):
    straight = run(tmp_path / "straight")
    resumed = interrupted_then_resumed(tmp_path / "resumed", monkeypatch)
    assert_same_weights(resumed, straight)
    assert [path.name for path in complete_checkpoints(tmp_path / "resumed")] == ["checkpoint-2", "checkpoint-4"]
    loaded = MaftModel.from_pretrained(tmp_path / "resumed" / "checkpoint-4" / "model")
    torch.testing.assert_close(loaded.ip_clip.post_layernorm.weight, resumed.ip_clip.post_layernorm.weight)


def test_resume_with_augmentation_equals_a_straight_run(tmp_path, monkeypatch):
    # batches of 1: the run stops in the middle of epoch 0 (after 3 of its 4 batches), and resumed goes on into epoch 1
    overrides = {"augmentation": SMALL_CROPS, "per_device_batch_size": 1, "max_steps": 6, "save_steps": 3}
    straight = run(tmp_path / "straight", **overrides)
    resumed = interrupted_then_resumed(tmp_path / "resumed", monkeypatch, **overrides)
    assert [path.name for path in complete_checkpoints(tmp_path / "resumed")] == ["checkpoint-3", "checkpoint-6"]
    assert_same_weights(resumed, straight)


def test_an_example_is_augmented_by_its_seed_epoch_and_index_alone():
    collator = MaftTrainingCollator(tiny_processor(), CLASS_NAMES, augmentation=SMALL_CROPS)
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
    assert card.data.library_name == "maft" and card.data.model_name == "user/maft-trained"
    assert card.data.base_model == "openai/clip-vit-base-patch16" and card.data.datasets == ["user/scenes"]
    assert "step 4 of 4" in card.text and "| learning_rate | 0.001 |" in card.text and "| mask_aware_loss |" in card.text
    assert len(hub_server.repositories["user/maft-trained"].commits) == 3  # creation, step 2, step 4
    assert isinstance(MaftModel.from_pretrained("user/maft-trained"), MaftModel)


def test_a_dead_hub_does_not_stop_training(tmp_path, hub_server, caplog):
    hub_server.stop()
    with caplog.at_level(logging.WARNING, logger="maft.training"):
        run(tmp_path, push_to_hub=True, hub_model_id="user/unreachable", hub_upload_retries=1)
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "model" / "model.safetensors").is_file()
    assert "upload of" in caplog.text and "user/unreachable" in caplog.text


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="`stage` must be one of maft, proposals"):
        MaftTrainingArguments(output_dir="x", stage="clip")
    with pytest.raises(ValueError, match="needs `hub_model_id`"):
        MaftTrainingArguments(output_dir="x", push_to_hub=True)
    defaults = MaftTrainingArguments(output_dir="x")
    assert (defaults.learning_rate, defaults.weight_decay, defaults.max_steps) == (1e-5, 1e-4, 1000)


def test_transformers_trainer_fine_tunes_stage_two_and_pushes_to_the_hub(tmp_path, hub_server):
    from transformers import Trainer, TrainingArguments

    model, processor = tiny_model(), tiny_processor()
    model.apply_mask_aware_finetuning_recipe()
    before = model.ip_clip.post_layernorm.weight.clone()
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
        remove_unused_columns=False, use_cpu=True, push_to_hub=True, hub_model_id="user/maft-trainer", save_strategy="no",
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=synthetic_dataset(),
                      data_collator=MaftTrainingCollator(processor, CLASS_NAMES))
    result = trainer.train()
    trainer.push_to_hub()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert not torch.equal(model.ip_clip.post_layernorm.weight, before)
    assert "model.safetensors" in hub_server.files("user/maft-trainer")


@pytest.mark.parametrize("stage", ["maft", "proposals"])
def test_accelerate_launch_with_two_processes(tmp_path, stage):
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    save_training_inputs(tmp_path)
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "maft.cli", "train", "--train-dataset", str(tmp_path / "data"),
         "--class-names", ", ".join(CLASS_NAMES), "--init-from", str(tmp_path / "init"), "--output-dir", str(tmp_path / "out"),
         "--stage", stage, "--crop-size", "64", "--max-steps", "2", "--save-steps", "1", "--per-device-batch-size", "1",
         "--learning-rate", "1e-3"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [path.name for path in complete_checkpoints(tmp_path / "out")] == ["checkpoint-1", "checkpoint-2"]
    before, after = load_file(tmp_path / "init" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    trained = ("ip_clip.",) if stage == "maft" else ("backbone.", "pixel_decoder.", "context_interaction.", "decoder.", "no_object")
    assert changed and all(name.startswith(trained) for name in changed)

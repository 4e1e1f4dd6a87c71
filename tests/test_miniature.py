"""The miniature world, its tokenizer and the reproduction pipeline (at toy sizes)."""

import json

import numpy as np
import pytest

from maft import MaftModel
from maft.miniature.reproduce import BASELINE, MAFT, MiniatureRecipe, reproduce_miniature
from maft.miniature.tokenizer import train_clip_tokenizer
from maft.miniature.world import (
    CLASS_NAMES, IGNORE_INDEX, SEEN_CLASS_NAMES, STUFF_COLOURS, THING_CLASSES, THING_COLOURS, UNSEEN_CLASS_NAMES, SceneSpec,
    build_dataset, hide_unseen_classes, scenes,
)
from maft.data.segmentation_data import segmentation_metadata


def test_the_split_holds_out_a_quarter_of_the_classes_whose_words_all_name_seen_classes():
    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 24
    assert len(UNSEEN_CLASS_NAMES) == len(CLASS_NAMES) // 4 and set(UNSEEN_CLASS_NAMES) <= set(CLASS_NAMES)
    seen_words = {word for name in SEEN_CLASS_NAMES for word in name.split()}
    for name in UNSEEN_CLASS_NAMES:
        assert set(name.split()) <= seen_words, name


def test_scenes_are_deterministic_for_a_seed_and_independent_of_how_many_are_drawn():
    first = list(scenes("train", 3, seed=7))
    again = list(scenes("train", 5, seed=7))[:3]
    other_seed = list(scenes("train", 3, seed=8))
    for (image, label, caption), (image_again, label_again, caption_again) in zip(first, again):
        np.testing.assert_array_equal(image, image_again)
        np.testing.assert_array_equal(label, label_again)
        assert caption == caption_again
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other_seed))
    assert not np.array_equal(first[0][0], next(scenes("test", 1, seed=7))[0])  # splits differ


def test_a_twin_differs_from_its_scene_only_in_shapes_or_textures():
    spec = SceneSpec(size=64)
    pairs = list(scenes("pretraining", 40, seed=3, spec=spec, twins=True))
    kept_words = set(THING_COLOURS) | set(STUFF_COLOURS)  # colours and surfaces never change

    def kept(caption: str) -> list[str]:
        return sorted(word.strip(",.") for word in caption.split() if word.strip(",.") in kept_words)

    for (image, label, caption), (twin_image, twin_label, twin_caption) in zip(pairs[::2], pairs[1::2]):
        assert caption != twin_caption and not np.array_equal(image, twin_image)
        if len(caption.split()) == len(twin_caption.split()):  # (a shape's area can cross the caption threshold)
            assert kept(caption) == kept(twin_caption), (caption, twin_caption)
        is_thing, twin_is_thing = label < len(THING_CLASSES), twin_label < len(THING_CLASSES)
        if not is_thing.any():
            np.testing.assert_array_equal(label != twin_label, True)  # every region changed texture, in place
        else:
            np.testing.assert_array_equal(label[~is_thing & ~twin_is_thing], twin_label[~is_thing & ~twin_is_thing])
    np.testing.assert_array_equal(pairs[0][0], next(scenes("pretraining", 1, seed=3, spec=spec, twins=True))[0])


def test_a_scene_labels_every_pixel_and_its_caption_names_the_large_regions():
    spec = SceneSpec(size=64, min_caption_fraction=0.05)
    for image, label, caption in scenes("examples", 20, seed=0, spec=spec):
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and label.shape == (64, 64)
        assert label.max() < len(CLASS_NAMES)
        counts = np.bincount(label.ravel(), minlength=len(CLASS_NAMES))
        for index, name in enumerate(CLASS_NAMES):
            if counts[index] >= 0.05 * 64 * 64:
                assert f"a {name}" in caption, (name, caption)
            elif counts[index] == 0:
                assert f"a {name}" not in caption, (name, caption)
        assert caption.startswith(("a photo of a ", "a picture of a ")) and caption.endswith(".")


def test_training_scenes_hide_unseen_classes():
    label = np.array([[CLASS_NAMES.index("red square"), CLASS_NAMES.index("red circle")]], dtype=np.uint8)
    np.testing.assert_array_equal(hide_unseen_classes(label), [[IGNORE_INDEX, CLASS_NAMES.index("red circle")]])
    dataset = build_dataset("train", 30, seed=0, spec=SceneSpec(size=32), seen_only=True)
    assert segmentation_metadata(dataset) == (CLASS_NAMES, IGNORE_INDEX)
    unseen = [CLASS_NAMES.index(name) for name in UNSEEN_CLASS_NAMES]
    labels = np.stack([np.asarray(label) for label in dataset["label"]])
    assert not np.isin(labels, unseen).any() and (labels == IGNORE_INDEX).any()


def test_the_tokenizer_learnt_from_captions_round_trips_class_names_and_reloads_as_clip(tmp_path):
    from transformers import CLIPTokenizer

    captions = [caption for _, _, caption in scenes("pretraining", 300, seed=0, spec=SceneSpec(size=32))]
    tokenizer = train_clip_tokenizer(captions)
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for name in CLASS_NAMES:
        ids = reloaded(name)["input_ids"]
        assert ids == tokenizer(name)["input_ids"]
        assert ids[0] == reloaded.bos_token_id and ids[-1] == reloaded.eos_token_id
        assert len(ids) == 4  # each word of the world is one token
        assert reloaded.decode(ids, skip_special_tokens=True) == name
    assert reloaded.convert_ids_to_tokens([len(reloaded) - 2, len(reloaded) - 1]) == ["<|startoftext|>", "<|endoftext|>"]
    assert reloaded.decode(reloaded("a zebra!")["input_ids"], skip_special_tokens=True) == "a zebra !"  # unseen words: bytes


def test_the_reproduction_runs_end_to_end_and_continues_after_an_interruption(tmp_path, capsys):
    recipe = MiniatureRecipe(image_size=64, train_scenes=16, test_scenes=4, pretraining_pairs=32, clip_width=32, clip_steps=2,
                             clip_batch_size=16, proposal_steps=2, maft_steps=2, batch_size=4, bundled_examples=2)
    (tmp_path / "clip.partial").mkdir()  # left by a run interrupted while pre-training: never taken as done
    (tmp_path / "clip.partial" / "config.json").write_text("{}")
    results = reproduce_miniature(tmp_path, recipe)
    assert not list(tmp_path.glob("*.partial")) and (tmp_path / "clip" / "model.safetensors").is_file()
    assert set(results) == {BASELINE, MAFT}
    for result in results.values():
        assert {"mIoU", "mIoU-seen", "mIoU-unseen", "hIoU"} <= set(result)
    table = capsys.readouterr().out
    assert f"| {MAFT} |" in table
    bundled = MaftModel.from_pretrained(tmp_path / "bundle" / "maft-mini")
    assert not any("teacher" in name for name in bundled.state_dict()) and not (tmp_path / "bundle.partial").exists()
    assert len(list((tmp_path / "bundle" / "examples").glob("scene-*-labels.png"))) == recipe.bundled_examples
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["recipe"]["seed"] == 0 and json.dumps(saved["results"]) == json.dumps(results)
    assert {"world", "clip pre-training", "stage 1", "stage 2"} <= set(saved["seconds"])
    # a rerun finds every step done and only reprints the table
    (tmp_path / "results.json").unlink()
    assert json.dumps(reproduce_miniature(tmp_path, recipe)) == json.dumps(saved["results"])
    assert "maft train" not in capsys.readouterr().out


def test_clip_pretraining_keeps_a_scene_and_its_twin_in_one_batch(monkeypatch):
    from maft.miniature.clip_pretraining import pretrain_clip, small_clip_config
    from maft.miniature.reproduce import MiniatureRecipe, image_processor_for

    pairs = build_dataset("pretraining", 12, seed=0, spec=SceneSpec(size=32), twins=True)
    tokenizer = train_clip_tokenizer(pairs["caption"])
    config = small_clip_config(len(tokenizer), image_size=32, width=16)
    processor = image_processor_for(MiniatureRecipe(image_size=32))
    with pytest.raises(ValueError, match="multiples of `group_size`"):
        pretrain_clip(pairs, tokenizer, processor, config, steps=1, batch_size=5, group_size=2)
    seen_batches = []
    original = tokenizer.__class__.__call__

    def recording(self, text, **kwargs):
        seen_batches.append(list(text))
        return original(self, text, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", recording)
    pretrain_clip(pairs, tokenizer, processor, config, steps=3, batch_size=4, group_size=2)
    captions = pairs["caption"]
    twins = {frozenset((captions[index], captions[index + 1])) for index in range(0, len(captions), 2)}
    assert len(seen_batches) == 3
    for batch in seen_batches:
        assert {frozenset(batch[index : index + 2]) for index in range(0, len(batch), 2)} <= twins

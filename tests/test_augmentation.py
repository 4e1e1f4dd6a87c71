"""The training augmentation of DESIGN.md §4."""

import numpy as np

from maft.training import MaftTrainingCollator
from maft.training.augmentation import AugmentationConfig, augment, photometric_distortion
from helpers import tiny_processor


def example(height=100, width=150, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros((height, width), dtype=np.int64)
    label[:, width // 2 :] = 3
    label[: height // 4] = 7
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return image, label


def test_deterministic_for_a_seed_and_different_across_seeds():
    config = AugmentationConfig(short_sides=(96, 128, 160), crop_size=96)
    first = augment(*example(), np.random.default_rng(5), config)
    again = augment(*example(), np.random.default_rng(5), config)
    other = augment(*example(), np.random.default_rng(6), config)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_sizes_label_values_and_padding():
    config = AugmentationConfig(short_sides=(64,), crop_size=96)
    for seed in range(5):
        image, label = augment(*example(), np.random.default_rng(seed), config)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8 and label.shape == (96, 96)
        assert set(np.unique(label)) <= {0, 3, 7, 255}  # nearest resizing invents no class
        # short side 64 -> 64 x 96: the crop is 64 rows high, the rest is padding
        assert (label[64:] == 255).all() and (image[64:] == 0).all()
        assert (label[:64] != 255).all()


def test_flip_moves_image_and_label_together():
    image, label = example(96, 96)
    config = AugmentationConfig(short_sides=(96,), crop_size=96, color_jitter=False, flip_probability=1.0)
    flipped_image, flipped_label = augment(image, label, np.random.default_rng(0), config)
    assert np.array_equal(flipped_image, image[:, ::-1]) and np.array_equal(flipped_label, label[:, ::-1])


def test_colour_jitter_changes_colours_within_range():
    image = example()[0]
    changed = [photometric_distortion(image, np.random.default_rng(seed)) for seed in range(6)]
    assert all(output.dtype == np.uint8 and output.shape == image.shape for output in changed)
    assert any(not np.array_equal(output, image) for output in changed)


def test_collator_augments_into_fixed_crops():
    collator = MaftTrainingCollator(tiny_processor(), augmentation=AugmentationConfig(short_sides=(64, 96), crop_size=64), seed=1)
    image, label = example()
    batch = collator([{"image": image, "label": label}, {"image": image, "label": label}])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["labels"].shape == (2, 64, 64)

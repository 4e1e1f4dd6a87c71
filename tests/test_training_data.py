"""Segmentation datasets: folder pairs, saving and loading, metadata."""

import numpy as np
import pytest
from PIL import Image

from maft.data.segmentation_data import load_image_folder_pairs, load_segmentation_dataset, segmentation_metadata


def write_pairs(root, stems=("a", "b", "c"), extra_label=None):
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for index, stem in enumerate(stems):
        Image.fromarray(np.full((8, 10, 3), index * 40, dtype=np.uint8)).save(root / "images" / f"{stem}.jpg")
        Image.fromarray(np.full((8, 10), index, dtype=np.uint8)).save(root / "labels" / f"{stem}.png")
    if extra_label:
        Image.fromarray(np.zeros((8, 10), dtype=np.uint8)).save(root / "labels" / f"{extra_label}.png")


def test_folder_pairs_save_and_load_with_metadata(tmp_path):
    write_pairs(tmp_path)
    dataset = load_image_folder_pairs(tmp_path / "images", tmp_path / "labels", ["sky", "tree", "road"], ignore_index=254)
    assert len(dataset) == 3
    assert np.asarray(dataset[1]["label"]).tolist() == [[1] * 10] * 8
    dataset.save_to_disk(tmp_path / "saved")
    loaded = load_segmentation_dataset(tmp_path / "saved")
    assert segmentation_metadata(loaded) == (["sky", "tree", "road"], 254)
    assert np.asarray(loaded[2]["image"]).shape == (8, 10, 3)


def test_unmatched_files_are_named(tmp_path):
    write_pairs(tmp_path, extra_label="lonely")
    with pytest.raises(ValueError, match="1 label maps without an image \\(e.g. \\['lonely'\\]\\)"):
        load_image_folder_pairs(tmp_path / "images", tmp_path / "labels", ["sky"])


def test_other_column_names_and_missing_metadata(tmp_path):
    import datasets

    plain = datasets.Dataset.from_dict(
        {"picture": [Image.new("RGB", (4, 4))], "mask": [Image.new("L", (4, 4))]},
        features=datasets.Features({"picture": datasets.Image(), "mask": datasets.Image()}),
    )
    plain.save_to_disk(tmp_path / "plain")
    loaded = load_segmentation_dataset(tmp_path / "plain", image_column="picture", label_column="mask")
    assert loaded.column_names == ["image", "label"]
    with pytest.raises(ValueError, match="does not record its class names"):
        segmentation_metadata(loaded)
    with pytest.raises(ValueError, match="has no column \\['segmentation'\\]"):
        load_segmentation_dataset(tmp_path / "plain", image_column="picture", label_column="segmentation")

"""The benchmark class lists and the loaders for the original MAFT folder layouts, on tiny fake folder trees."""

import json
from importlib import resources

import numpy as np
import pytest
from PIL import Image

from maft.evaluation.benchmark_datasets import (
    BENCHMARKS,
    benchmark_class_names,
    benchmark_ignore_index,
    coco_stuff_unseen_class_names,
    load_benchmark,
)
from maft.data.segmentation_data import load_segmentation_dataset, segmentation_metadata

from helpers import ORIGINAL_VAL_LAYOUT, write_split


EXPECTED = {  # name: (number of classes, ignore index)
    "coco_stuff_171": (171, 255),
    "ade20k_150": (150, 255),
    "ade20k_847": (847, 65535),
    "pascal_context_59": (59, 255),
    "pascal_context_459": (459, 65535),
    "pascal_voc_20": (20, 255),
}

@pytest.mark.parametrize("name", BENCHMARKS)
def test_class_lists_and_ignore_index(name):
    num_classes, ignore_index = EXPECTED[name]
    names = benchmark_class_names(name)
    assert len(names) == num_classes
    assert len(set(names)) == num_classes
    assert all(isinstance(n, str) and n for n in names)
    assert benchmark_ignore_index(name) == ignore_index


def test_known_class_names_in_label_order():
    assert benchmark_class_names("coco_stuff_171")[:3] == ["person", "bicycle", "car"]
    assert benchmark_class_names("coco_stuff_171")[-1] == "wood"
    assert benchmark_class_names("ade20k_150")[:3] == ["wall", "building", "sky"]
    assert benchmark_class_names("ade20k_150")[-1] == "flag"
    assert benchmark_class_names("ade20k_847")[846] == "adding machine, totalizer, totaliser"
    assert benchmark_class_names("ade20k_847")[500] == "cat"
    assert benchmark_class_names("pascal_context_59")[49] == "diningtable"
    assert benchmark_class_names("pascal_context_459") == sorted(benchmark_class_names("pascal_context_459"))
    assert benchmark_class_names("pascal_voc_20")[0] == "aeroplane"
    assert "background" not in benchmark_class_names("pascal_voc_20")
    # Callers get copies: changing one does not change the stored list.
    benchmark_class_names("pascal_voc_20").append("extra")
    assert len(benchmark_class_names("pascal_voc_20")) == 20


def test_coco_stuff_unseen_split():
    unseen = coco_stuff_unseen_class_names()
    coco = benchmark_class_names("coco_stuff_171")
    assert len(unseen) == 15
    assert set(unseen) <= set(coco)
    assert set(unseen) == {"frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow",
                           "road", "wall-concrete", "tree", "grass", "river", "clouds", "playingfield"}
    assert unseen == [n for n in coco if n in unseen]  # in label order
    assert len([n for n in coco if n not in unseen]) == 156


def test_json_records_where_each_list_came_from():
    with resources.files("maft").joinpath("data/benchmark_classes.json").open() as file:
        data = json.load(file)
    for name in BENCHMARKS:
        assert data[name]["source"]["repo"] and data[name]["source"]["path"]
    assert data["coco_stuff_171"]["unseen_source"]["repo"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_loads_original_layout(tmp_path, name):
    num_classes, ignore_index = EXPECTED[name]
    image_dir, label_dir, label_suffix = ORIGINAL_VAL_LAYOUT[name]
    write_split(tmp_path, image_dir, label_dir, label_suffix, num_classes, ignore_index)
    dataset = load_benchmark(name, tmp_path, "val")
    assert len(dataset) == 2  # the unlabelled image is left out
    assert segmentation_metadata(dataset) == (benchmark_class_names(name), ignore_index)
    assert sorted(dataset.to_dict()["label"][i]["path"].rsplit("/", 1)[-1] for i in range(2)) == [
        f"a_001{label_suffix}", f"b_002{label_suffix}"]
    label = np.asarray(dataset[0]["label"])
    assert label.shape == (6, 8)
    assert label[0, 0] == ignore_index
    assert label[1, 0] == num_classes - 1
    assert label[1, 7] == 0
    assert np.asarray(dataset[1]["image"]).shape == (6, 8, 3)


def test_ade847_16_bit_labels_survive_saving(tmp_path):
    image_dir, label_dir, suffix = ORIGINAL_VAL_LAYOUT["ade20k_847"]
    write_split(tmp_path, image_dir, label_dir, suffix, 847, 65535)
    dataset = load_benchmark("ade20k_847", tmp_path)
    label = np.asarray(dataset[0]["label"])
    assert label.dtype == np.uint16
    assert set(np.unique(label).tolist()) == {0, 846, 65535}
    dataset.save_to_disk(tmp_path / "saved")
    loaded = load_segmentation_dataset(tmp_path / "saved")
    assert set(np.unique(np.asarray(loaded[1]["label"])).tolist()) == {0, 846, 65535}
    assert segmentation_metadata(loaded)[1] == 65535


def test_train_split_and_other_places_the_original_uses(tmp_path):
    write_split(tmp_path, "coco/train2017", "coco/stuffthingmaps_detectron2/train2017", ".png", 171, 255)
    assert len(load_benchmark("coco_stuff_171", tmp_path, "train")) == 2
    # The original prepare script writes the ADE20K-847 images under ade20k/ (and registers the datasets at the root).
    write_split(tmp_path, "ade20k/ADE20K_2021_17_01/images_detectron2/validation",
                "ade/ADE20K_2021_17_01/annotations_detectron2/validation", ".tif", 847, 65535)
    assert len(load_benchmark("ade20k_847", tmp_path, "val")) == 2
    write_split(tmp_path, "ADEChallengeData2016/images/training", "ADEChallengeData2016/annotations_detectron2/training",
                ".png", 150, 255)
    assert len(load_benchmark("ade20k_150", tmp_path, "train")) == 2
    # Pascal Context as the original registers it: images copied to VOC2010/val/image.
    write_split(tmp_path, "VOCdevkit/VOC2010/val/image", "VOCdevkit/VOC2010/annotations_detectron2_ovs/pc459_val",
                ".tif", 459, 65535, unlabelled=())
    assert len(load_benchmark("pascal_context_459", tmp_path, "val")) == 2


def test_unknown_benchmark_names_the_allowed_ones(tmp_path):
    for call in (lambda: load_benchmark("ade20k", tmp_path), lambda: benchmark_class_names("voc"),
                 lambda: benchmark_ignore_index("coco")):
        with pytest.raises(ValueError, match="Unknown benchmark .*coco_stuff_171, ade20k_150, ade20k_847, "
                                             "pascal_context_59, pascal_context_459, pascal_voc_20"):
            call()


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="Unknown split 'train' for pascal_voc_20: choose one of val"):
        load_benchmark("pascal_voc_20", tmp_path, "train")
    with pytest.raises(ValueError, match="Unknown split 'test' for coco_stuff_171: choose one of train, val"):
        load_benchmark("coco_stuff_171", tmp_path, "test")


def test_missing_folders_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="expected the folder .*VOCdevkit/VOC2012/JPEGImages.*prepare_voc_sem_seg.py"):
        load_benchmark("pascal_voc_20", tmp_path)
    (tmp_path / "VOCdevkit/VOC2010/JPEGImages").mkdir(parents=True)
    with pytest.raises(ValueError, match="label maps .*annotations_detectron2_ovs/pc59_val.*prepare_pascal_ctx_sem_seg.py"):
        load_benchmark("pascal_context_59", tmp_path)
    with pytest.raises(ValueError, match="ADE20K_2021_17_01/images_detectron2/validation.*also accepted"):
        load_benchmark("ade20k_847", tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_benchmark("ade20k_150", tmp_path / "nowhere")


def test_label_maps_without_images_are_an_error(tmp_path):
    image_dir, label_dir, suffix = ORIGINAL_VAL_LAYOUT["pascal_voc_20"]
    write_split(tmp_path, image_dir, label_dir, suffix, 20, 255)
    Image.fromarray(np.zeros((6, 8), dtype=np.uint8)).save(tmp_path / label_dir / "lonely.png")
    with pytest.raises(ValueError, match="1 label maps without an image"):
        load_benchmark("pascal_voc_20", tmp_path)
    for path in (tmp_path / label_dir).iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="No label maps found"):
        load_benchmark("pascal_voc_20", tmp_path)

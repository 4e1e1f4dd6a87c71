"""Panoptic annotations: the COCO panoptic layout and its loader, the miniature world's instances, the training maps
and stage 1's panoptic targets (things one per instance, stuff one per class, crowd ignored), and stage 1 overfitting
a panoptic batch."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import overfit_stage_one, random_image, tiny_model, tiny_processor
from maft.loss_maft import panoptic_targets, semantic_targets
from maft.miniature.world import (
    CLASS_NAMES as WORLD_CLASS_NAMES, THING_CLASSES, UNSEEN_CLASS_NAMES, SceneSpec, build_dataset, drawn_scenes,
    panoptic_annotation, scenes,
)
from maft.data.segmentation_data import (
    load_coco_panoptic, load_segmentation_dataset, panoptic_thing_class_ids, recorded_thing_class_names, rgb_to_segment_ids, segment_ids_to_rgb,
)
from maft.training import MaftTrainingCollator
from maft.training.augmentation import AugmentationConfig
from maft.training.collator import panoptic_training_maps


def test_segment_ids_round_trip_through_the_coco_png_encoding():
    ids = np.array([[0, 1, 255], [256, 65536 + 7, 256**3 - 1]])
    encoded = segment_ids_to_rgb(ids)
    assert encoded.dtype == np.uint8 and encoded[1, 0].tolist() == [0, 1, 0]  # id = R + 256 G + 256^2 B
    np.testing.assert_array_equal(rgb_to_segment_ids(Image.fromarray(encoded)), ids)
    with pytest.raises(ValueError, match="segment ids must be in"):
        segment_ids_to_rgb(np.array([[-1]]))


def test_training_maps_separate_thing_instances_merge_nothing_and_ignore_crowd_and_void():
    # category 0 a thing, 1 stuff; segments 5 and 6 are two instances of 0, 7 is crowd (category 0), 9 stuff
    segment_ids = np.array([[5, 5, 6, 6],
                            [7, 7, 9, 9],
                            [0, 9, 9, 9]])
    info = [{"id": 5, "category_id": 0, "iscrowd": 0}, {"id": 6, "category_id": 0, "iscrowd": 0},
            {"id": 7, "category_id": 0, "iscrowd": 1}, {"id": 9, "category_id": 1, "iscrowd": 0}]
    labels, instances = panoptic_training_maps(segment_ids_to_rgb(segment_ids), info, thing_class_ids=[0], ignore_index=255)
    np.testing.assert_array_equal(labels, [[0, 0, 0, 0], [255, 255, 1, 1], [255, 1, 1, 1]])
    np.testing.assert_array_equal(instances, [[1, 1, 2, 2], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_panoptic_targets_one_per_instance_and_one_per_stuff_class():
    labels = torch.tensor([[[0, 0, 0, 0],
                            [1, 1, 255, 1],
                            [2, 2, 1, 1]]])
    instances = torch.tensor([[[1, 1, 2, 2],
                               [0, 0, 0, 0],
                               [0, 0, 0, 0]]])
    (classes, masks), = panoptic_targets(labels, instances, ignore_index=255)
    # stuff 1 and 2 (class 1's two separate regions are one target), then the two instances of class 0
    assert classes.tolist() == [1, 2, 0, 0]
    assert masks[0].tolist() == [[0, 0, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1]]
    assert masks[2].tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert masks[3].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    # with no instance, exactly the semantic targets
    (semantic_classes, semantic_masks), = semantic_targets(labels, 255)
    (classes, masks), = panoptic_targets(labels, torch.zeros_like(labels), 255)
    assert torch.equal(classes, semantic_classes) and torch.equal(masks, semantic_masks)


def test_the_miniature_records_each_things_instance_and_keeps_its_semantic_data():
    spec = SceneSpec(size=48, things=(3, 3))
    for (image, label, caption), scene in zip(scenes("test", 12, seed=0, spec=spec), drawn_scenes("test", 12, seed=0, spec=spec)):
        np.testing.assert_array_equal(image, scene.image)
        np.testing.assert_array_equal(label, scene.label)
        assert caption == scene.caption
        is_thing = label < len(THING_CLASSES)
        np.testing.assert_array_equal(scene.instances > 0, is_thing)
        segment_ids, info = panoptic_annotation(scene.label, scene.instances)
        assert (segment_ids > 0).all() and sorted(segment["id"] for segment in info) == list(range(1, len(info) + 1))
        categories = np.zeros_like(label)
        for segment in info:
            assert segment["area"] == (segment_ids == segment["id"]).sum() > 0
            categories[segment_ids == segment["id"]] = segment["category_id"]
        np.testing.assert_array_equal(categories, label)  # the panoptic annotation says what the label map says
        stuff = [segment["category_id"] for segment in info if segment["category_id"] >= len(THING_CLASSES)]
        assert len(stuff) == len(set(stuff))  # one segment per stuff class
    # two things of one class, drawn apart: two segments where the label map has one region
    label = np.full((4, 6), len(THING_CLASSES), dtype=np.uint8)
    label[:, [0, 4]] = 0
    instances = np.zeros((4, 6), dtype=np.int32)
    instances[:, 0], instances[:, 4] = 1, 2
    _, info = panoptic_annotation(label, instances)
    assert [segment["category_id"] for segment in info] == [0, 0, len(THING_CLASSES)]


def test_miniature_datasets_carry_panoptic_annotations_and_hide_unseen_segments(tmp_path):
    dataset = build_dataset("train", 6, seed=0, spec=SceneSpec(size=32), seen_only=True)
    assert recorded_thing_class_names(dataset) == THING_CLASSES
    assert panoptic_thing_class_ids(dataset) == list(range(len(THING_CLASSES)))
    dataset.save_to_disk(str(tmp_path / "train"))
    reloaded = load_segmentation_dataset(str(tmp_path / "train"))
    unseen = {WORLD_CLASS_NAMES.index(name) for name in UNSEEN_CLASS_NAMES}
    for example in reloaded:
        labels, _ = panoptic_training_maps(example["panoptic"], example["segments_info"], range(len(THING_CLASSES)))
        np.testing.assert_array_equal(labels, np.asarray(example["label"]))  # unseen and hidden alike
        assert not unseen & {segment["category_id"] for segment in example["segments_info"]}


def write_coco_panoptic(root) -> None:
    (root / "images").mkdir()
    (root / "panoptic").mkdir()
    segment_ids = np.zeros((8, 8), dtype=np.int64)
    segment_ids[:4], segment_ids[4:, :4], segment_ids[4:, 4:] = 3, 1000, 70000
    Image.fromarray(segment_ids_to_rgb(segment_ids)).save(root / "panoptic" / "000001.png")
    random_image(8, 8).save(root / "images" / "000001.jpg")
    annotation = {
        "categories": [{"id": 17, "name": "cat", "isthing": 1}, {"id": 184, "name": "sky", "isthing": 0},
                       {"id": 1, "name": "person", "isthing": 1}],
        "annotations": [{"file_name": "000001.png", "image_id": 1, "segments_info": [
            {"id": 3, "category_id": 184, "iscrowd": 0, "area": 32}, {"id": 1000, "category_id": 17, "iscrowd": 0, "area": 16},
            {"id": 70000, "category_id": 1, "iscrowd": 1, "area": 16}]}],
    }
    (root / "panoptic.json").write_text(json.dumps(annotation))


def test_coco_panoptic_loads_as_a_dataset_with_class_indices_and_thing_classes(tmp_path):
    write_coco_panoptic(tmp_path)
    dataset = load_coco_panoptic(tmp_path / "images", tmp_path / "panoptic", tmp_path / "panoptic.json")
    example = dataset[0]
    assert [segment["category_id"] for segment in example["segments_info"]] == [2, 1, 0]  # categories sorted by id
    assert recorded_thing_class_names(dataset) == ["person", "cat"] and panoptic_thing_class_ids(dataset) == [0, 1]
    segment_ids = rgb_to_segment_ids(example["panoptic"])
    assert set(np.unique(segment_ids)) == {3, 1000, 70000}
    labels, instances = panoptic_training_maps(example["panoptic"], example["segments_info"], [0, 1])
    assert set(np.unique(labels[4:, 4:])) == {255} and (labels[4:, :4] == 1).all() and (labels[:4] == 2).all()
    (tmp_path / "panoptic" / "000001.png").rename(tmp_path / "000001.png")
    (tmp_path / "images" / "000001.jpg").unlink()
    with pytest.raises(ValueError, match="No image 000001"):
        load_coco_panoptic(tmp_path / "images", tmp_path / "panoptic", tmp_path / "panoptic.json")


def test_a_semantic_dataset_asked_for_panoptic_targets_says_what_is_missing():
    dataset = build_dataset("test", 2, seed=0, spec=SceneSpec(size=32)).remove_columns(["panoptic", "segments_info"])
    with pytest.raises(ValueError, match="columns panoptic and segments_info"):
        panoptic_thing_class_ids(dataset)


def panoptic_examples(size: int = 2) -> list[dict]:
    """Two things of class 0 ("cat") side by side on stuff class 2 ("sky"), a crowd of class 1 ("dog")."""
    examples = []
    for index in range(size):
        segment_ids = np.full((64, 64), 9, dtype=np.int64)
        segment_ids[16:40, 8:28], segment_ids[16:40, 36:56] = 1, 2
        segment_ids[48:, :16] = 3
        segment_ids[:4] = 0
        examples.append({"image": random_image(64, 64, seed=index), "panoptic": Image.fromarray(segment_ids_to_rgb(segment_ids)),
                         "segments_info": [{"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 0, "iscrowd": 0},
                                           {"id": 3, "category_id": 1, "iscrowd": 1}, {"id": 9, "category_id": 2, "iscrowd": 0}]})
    return examples


def test_the_collator_gives_labels_and_instances_that_augmentation_moves_together():
    processor = tiny_processor()
    batch = MaftTrainingCollator(processor, thing_class_ids=[0, 1])(panoptic_examples())
    assert batch["labels"].shape == batch["instance_labels"].shape == (2, 64, 64)
    assert batch["instance_labels"].unique().tolist() == [0, 1, 2]
    assert (batch["labels"][:, 48:, :16] == 255).all() and (batch["labels"][:, :4] == 255).all()  # crowd, void
    augmented = MaftTrainingCollator(processor, thing_class_ids=[0, 1], seed=3,
                                     augmentation=AugmentationConfig(short_sides=(96,), crop_size=80, color_jitter=False))(panoptic_examples())
    labels, instances = augmented["labels"], augmented["instance_labels"]
    assert labels.shape == instances.shape and (labels[:, 80:] == 255).all()  # the 80 px crop, padded to /32
    assert (labels[instances > 0] == 0).all() and (instances[labels == 2] == 0).all()
    assert (instances[labels == 255] == 0).all()  # padding and crowd: ignored, no instance


def test_stage_one_overfits_a_panoptic_batch_with_one_query_per_instance(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    collator = MaftTrainingCollator(processor, thing_class_ids=[0, 1])
    trained, batch, stage_loss, text_embeds, initial, final = overfit_stage_one(model, processor, panoptic_examples(), collator, 40, tmp_path)
    with torch.no_grad():
        outputs = trained.eval()(**stage_loss.model_inputs(batch, text_embeds))
    assert final < 0.5 * initial
    # the two cats are two proposals: each instance's best mask covers it and not the other one
    masks = torch.nn.functional.interpolate(outputs.masks_queries_logits, size=(64, 64), mode="bilinear").sigmoid()[0] > 0.5
    first, second = torch.zeros(64, 64, dtype=torch.bool), torch.zeros(64, 64, dtype=torch.bool)
    first[16:40, 8:28], second[16:40, 36:56] = True, True
    iou = lambda mask, target: ((mask & target).sum() / (mask | target).sum()).item()  # noqa: E731
    best_first = max(range(len(masks)), key=lambda query: iou(masks[query], first))
    best_second = max(range(len(masks)), key=lambda query: iou(masks[query], second))
    assert best_first != best_second and iou(masks[best_first], first) > 0.5 and iou(masks[best_second], second) > 0.5

"""`evaluate` metrics that ship with maft and load offline: `evaluate.load(MEAN_IOU_METRIC_PATH)`."""

from pathlib import Path


MEAN_IOU_METRIC_PATH = str(Path(__file__).with_name("mean_iou"))

__all__ = ["MEAN_IOU_METRIC_PATH"]

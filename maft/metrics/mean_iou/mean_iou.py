"""mIoU, fwIoU, mACC, pACC (and seen / unseen / harmonic-mean IoU) of semantic segmentation, as MAFT evaluates
(detectron2's semantic evaluator, DESIGN.md §5). Load offline with `evaluate.load(maft.metrics.MEAN_IOU_METRIC_PATH)`."""

import datasets
import evaluate

from maft.evaluation.metrics import StreamingConfusionMatrix


class MeanIoU(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="MAFT: Learning Mask-aware CLIP Representations for Zero-Shot Segmentation (NeurIPS 2023)",
            inputs_description="predictions and references: lists of 2-D arrays of class indices",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int = 255, class_names=None,
                 unseen_class_names=()):
        matrix = StreamingConfusionMatrix(num_labels, ignore_index)
        for prediction, reference in zip(predictions, references):
            matrix.update(prediction, reference)
        return matrix.compute(class_names, unseen_class_names)

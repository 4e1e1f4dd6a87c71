"""Evaluation with the protocol of DESIGN.md §5: the metrics (semantic; panoptic PQ and instance mask AP), a model's evaluation on a dataset, and the benchmark
datasets in the original folder layouts with their class lists."""

from .benchmark_datasets import BENCHMARKS, load_benchmark
from .dataset_evaluation import EvaluationSet, evaluate_on_dataset
from .metrics import StreamingConfusionMatrix, format_results_table
from .panoptic_metrics import StreamingMaskAP, StreamingPanopticQuality


__all__ = ["BENCHMARKS", "EvaluationSet", "StreamingConfusionMatrix", "StreamingMaskAP", "StreamingPanopticQuality", "evaluate_on_dataset", "format_results_table", "load_benchmark"]

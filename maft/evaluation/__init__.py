"""Evaluation with the protocol of DESIGN.md §5: the metrics, a model's evaluation on a dataset, and the benchmark
datasets in the original folder layouts with their class lists."""

from .benchmark_datasets import BENCHMARKS, load_benchmark
from .dataset_evaluation import EvaluationSet, evaluate_on_dataset
from .metrics import StreamingConfusionMatrix, format_results_table


__all__ = ["BENCHMARKS", "EvaluationSet", "StreamingConfusionMatrix", "evaluate_on_dataset", "format_results_table", "load_benchmark"]

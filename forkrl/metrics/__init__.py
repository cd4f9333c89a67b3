"""Metrics: held-out evaluation (accuracy, pass@k) and sinks (jsonl, TensorBoard, wandb)."""
from forkrl.metrics.evaluate import evaluate, pass_at_k
from forkrl.metrics.sinks import JsonlSink, make_sinks

__all__ = ["JsonlSink", "evaluate", "make_sinks", "pass_at_k"]

"""Evaluation: sizes, reconstruction quality and task metrics."""

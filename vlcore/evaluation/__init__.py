"""Evaluation library (docs/evaluation.md)."""

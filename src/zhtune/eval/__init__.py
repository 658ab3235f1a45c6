"""Evaluation: scores of a run directory on held-out data."""

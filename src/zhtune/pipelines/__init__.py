"""Pipelines above training and evaluation: a grid of runs scored into one table (experiment), and
the whole loop on the bundled skills (quickstart)."""

"""Inference: prompt building, batched and streaming generation, terminal chat."""

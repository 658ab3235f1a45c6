"""Models: load any local Hugging Face causal LM (or a zhtune run directory), family defaults
as a registry, and tiny locally-built models for tests and the quickstart."""

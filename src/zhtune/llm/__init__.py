"""Talking to OpenAI-compatible endpoints (teacher models for data generation, LLM judges)."""

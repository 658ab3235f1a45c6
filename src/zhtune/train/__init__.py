"""Training: the config, the method registry, and the SFT loop."""

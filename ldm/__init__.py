"""Floor 1: the shared core (diffusion math, attention, layers, text encoders, IO, metrics)."""

"""Floor 2: video autoencoders behind one contract (see base.py). Importing the package registers
every family; ``build(name, **overrides)`` makes a model."""
from autoencoders import causal3d, kl2d, pretrained  # noqa: F401  (registration side effects)
from autoencoders.base import (FAMILIES, REGISTRY, AEConfig, AEOutput, Autoencoder, build, describe,
                               load_pretrained)

__all__ = ["FAMILIES", "REGISTRY", "AEConfig", "AEOutput", "Autoencoder", "build", "describe", "load_pretrained"]

"""Floor 2: video autoencoders behind one contract (see base.py). Importing the package imports
every module in it, so each family file registers its names; ``build(name, **overrides)`` makes a
model."""
import importlib
import pkgutil

from autoencoders.base import (FAMILIES, REGISTRY, AEConfig, AEOutput, Autoencoder, build, describe,
                               load_pretrained)

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["FAMILIES", "REGISTRY", "AEConfig", "AEOutput", "Autoencoder", "build", "describe", "load_pretrained"]

"""Floor 2: video autoencoders behind one contract (see base.py). Importing the package imports
every module in it, so each family file registers its names (and each source its prefix);
``build(name, **overrides)`` makes a model, ``resolve(ref, checkpoint)`` answers "which
autoencoder" for every verb (resolve.py)."""
import importlib
import pkgutil

from autoencoders.base import (FAMILIES, LOADERS, REGISTRY, AEConfig, AEOutput, Autoencoder, build, describe,
                               load_pretrained, meta_model)
from autoencoders.resolve import Resolved, config_of, record_of, resolve, resolve_record

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["FAMILIES", "REGISTRY", "LOADERS", "AEConfig", "AEOutput", "Autoencoder", "build", "describe",
           "load_pretrained", "meta_model", "Resolved", "resolve", "resolve_record", "record_of", "config_of"]

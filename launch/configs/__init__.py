"""The built-in configs: training YAMLs (``train-debug``, the demos), the papers' recipes
(``recipes/``) and DeepSpeed JSONs (``zero0`` .. ``zero3``). ``--config`` takes a path or, when no
such file exists, one of these by name, so a command works from any folder."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import yaml

from ldm.errors import UserError

CONFIG_DIR = Path(__file__).parent
FOLDERS = (CONFIG_DIR, CONFIG_DIR / "recipes")
NOT_LDM = ("accelerate-zero2",)  # `accelerate launch --config_file` configs, not ldm's


def builtin_names() -> list[str]:
    """Names ``config_path`` resolves: the built-in YAMLs' stems."""
    return sorted(p.stem for folder in FOLDERS for p in folder.glob("*.yaml") if p.stem not in NOT_LDM)


def config_path(value: str) -> str:
    """What ``--config VALUE`` names: an existing file as given; else a built-in YAML named by its
    stem (``train-debug``, ``hivae-stage1``; ``.yaml`` optional); else a `UserError` listing them."""
    if Path(value).is_file():
        return value
    stem = value[:-len(".yaml")] if value.endswith(".yaml") else value
    if "/" not in stem and "\\" not in stem:
        for folder in FOLDERS:
            if stem not in NOT_LDM and (folder / f"{stem}.yaml").is_file():
                return str(folder / f"{stem}.yaml")
    what = "is a folder" if Path(value).is_dir() else "not found"
    raise UserError(f"config file {value} {what}; give a YAML path or a built-in config: {', '.join(builtin_names())}")


# the verbs that take --config, and the dataclass of their settings
CONFIG_CLASSES = {"train": ("launch.train", "TrainConfig"), "train-ae": ("launch.train_ae", "TrainAEConfig"),
                  "extract": ("launch.extract", "ExtractConfig"), "demo": ("launch.demo", "DemoConfig")}


def _fields(verb: str) -> set[str]:
    module, name = CONFIG_CLASSES[verb]
    return {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}


def check_verb(verb: str, path: str, given: str | None = None) -> None:
    """A `UserError` when the YAML at ``path`` holds keys ``verb`` does not know but is another
    verb's config (``ldm train-ae --config hivae-generator``: a DiT recipe), naming that verb
    (``given``: what the user typed, for the message); otherwise nothing (the verb's own loading
    reports any other bad key)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return  # the verb's loading says what is wrong with the file
    if verb not in CONFIG_CLASSES or not isinstance(data, dict) or set(data) <= _fields(verb):
        return
    for other in CONFIG_CLASSES:
        if other != verb and set(data) <= _fields(other):
            given = given or path
            raise UserError(f"--config {given} is an `ldm {other}` config: it has "
                            f"{', '.join(sorted(set(data) - _fields(verb)))}, which `ldm {verb}` does not take; "
                            f"run `ldm {other} --config {given}`")

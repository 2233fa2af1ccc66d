"""The built-in configs: training YAMLs (``train-debug``, the demos), the papers' recipes
(``recipes/``) and DeepSpeed JSONs (``zero0`` .. ``zero3``). ``--config`` takes a path or, when no
such file exists, one of these by name, so a command works from any folder."""
from __future__ import annotations

from pathlib import Path

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

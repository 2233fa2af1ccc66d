"""ldm/config.py: numbers as people write them, strict keys, clear errors naming the key or file."""
from dataclasses import dataclass, field

import pytest

from ldm import config as cfglib
from ldm.errors import UserError


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    min_lr: float | None = None


@dataclass(frozen=True)
class Run:
    steps: int = 10
    save_every: int = 5
    name: str = "x"
    optim: Optim = field(default_factory=Optim)


def test_exponents_and_underscores_in_yaml_and_on_the_command_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("steps: 1_000\nsave_every: 1e3\noptim:\n  lr: 3e-4\n  betas: [9e-1, 0.95]\n  min_lr: 1e-6\n")
    cfg = cfglib.load_yaml(f, Run)
    assert (cfg.steps, cfg.save_every) == (1000, 1000)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.min_lr == pytest.approx(1e-6)
    cfg = cfglib.load_yaml(f, Run, ["optim.lr=1e-6", "steps=2_000", "save_every=+5E2", "name=3e-4"])
    assert (cfg.optim.lr, cfg.steps, cfg.save_every, cfg.name) == (1e-6, 2000, 500, "3e-4")


@pytest.mark.parametrize("override, match", [
    ("steps=1.5e0", "Run.steps: expected int, got '1.5e0'"),
    ("steps=2.5", "Run.steps: expected int, got 2.5"),
    ("optim.lr=fast", "Optim.lr: expected float, got 'fast'"),
    ("optim.lr=true", "Optim.lr: expected float, got True"),
    ("optim.lr=1e-4e", "Optim.lr"),
    ("optim.lrr=1", "unknown key"),
    ("steps", "not of the form"),
    ("optim=3", r"Run.optim: expected a section of Optim keys \(lr, betas, min_lr\), got 3"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(UserError, match=match):
        cfglib.from_dict(Run, cfglib.apply_dotted({}, [override]))


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.yaml not found"):
        cfglib.load_yaml(tmp_path / "nope.yaml", Run)
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    with pytest.raises(UserError, match="bad.yaml is not valid YAML"):
        cfglib.load_yaml(tmp_path / "bad.yaml", Run)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="expected a mapping"):
        cfglib.load_yaml(tmp_path / "list.yaml", Run)

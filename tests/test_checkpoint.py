"""ldm/checkpoint.py: atomic writes with the user's umask (teammates can read checkpoints)."""
import os
import stat

import pytest
import torch

from ldm.checkpoint import atomic_write_bytes, atomic_write_json, load_tensors, save_tensors


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a" / "config.json", {"x": 1})
        atomic_write_bytes(tmp_path / "b.bin", b"123")
        save_tensors(tmp_path / "model.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    for name in ("a/config.json", "b.bin", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert torch.equal(load_tensors(tmp_path / "model.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "model.safetensors"]  # no temp left


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    atomic_write_bytes(tmp_path / "f", b"old")

    class Boom:
        def __len__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "f", Boom())
    assert (tmp_path / "f").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]

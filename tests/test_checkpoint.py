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


def test_a_sealed_checkpoint_is_on_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    """A machine crash right after a checkpoint is sealed cannot leave it damaged: every file
    (tensors too, was: save_tensors never fsynced) and folder is flushed before the rename that
    seals it, and the rename is flushed after it."""
    from launch import runs
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a))), real_rename(a, b))[1])
    folder = runs.begin(tmp_path, 3)
    save_tensors(folder / "ema.safetensors", {"w": torch.ones(2)})
    (folder / "sub" / "deep").mkdir(parents=True)
    (folder / "sub" / "deep" / "shard.pt").write_bytes(b"written by another library, never fsynced")
    assert ("fsync", str(folder / "ema.safetensors")) not in events  # the temporary name's, then renamed
    assert len(events) == 1 and events[0][1].startswith(str(folder / ".ema.safetensors."))
    final = runs.commit(tmp_path, 3, keep=2)
    sealed = events.index(("rename", str(folder)))
    before = {path for kind, path in events[:sealed] if kind == "fsync"}
    for name in ("ema.safetensors", "sub/deep/shard.pt", "sub/deep", "sub", ""):
        assert str((folder / name).resolve()) in before, name
    manifest = [i for i, (_, path) in enumerate(events) if path.startswith(str(folder / ".MANIFEST.json."))]
    assert manifest and manifest[0] < events.index(("fsync", str(folder))) < sealed  # written, then its name
    assert ("fsync", str(tmp_path)) in events[sealed:]
    assert runs.verify_checkpoint(final) is None


def test_a_failed_checkpoint_write_names_the_rank_and_host_of_several(tmp_path, monkeypatch):
    """A node's own quota, mount or disk fails on its ranks only: the line says which (was: the
    same line from any rank, naming none)."""
    import errno
    import socket

    from launch import runs

    (tmp_path / ".step-00000004.tmp").mkdir()
    error = OSError(errno.EDQUOT, "Disk quota exceeded")
    alone = str(runs.write_failed(tmp_path, 4, error))
    assert " on rank " not in alone and not (tmp_path / ".step-00000004.tmp").exists()
    monkeypatch.setattr(runs.dist, "world_size", lambda: 16)
    monkeypatch.setattr(runs.dist, "rank", lambda: 9)
    line = str(runs.write_failed(tmp_path, 4, error))
    assert f"failed on rank 9 ({socket.gethostname()}) (OSError:" in line and "run the same command" in line

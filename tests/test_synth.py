"""data.synth: class ids, captions, determinism, motion inside the frame, dataset layouts, `ldm data`."""
from __future__ import annotations

import argparse
import itertools
import json
import tarfile

import numpy as np
import pytest

from data.synth import (BACKGROUNDS, CARDINAL, COLORS, DIRECTION_VECTORS, DIRECTIONS, MARGIN, NUM_CLASSES,
                        SHAPES, caption, class_attributes, class_id, combinations, parse_attributes, parse_combo,
                        plan_motion, render_clip, synth_clip, synth_dataset)
from data.video import read_video
from launch import data_cmd
from launch.cli import console


def test_class_ids_are_a_fixed_bijection():
    ids = [class_id(s, c, d) for s, c, d in itertools.product(SHAPES, COLORS, DIRECTIONS)]
    assert ids == list(range(NUM_CLASSES))   # shape-major, direction fastest
    assert class_id("circle", "red", "left") == 0
    assert class_id("square", "red", "left") == len(COLORS) * len(DIRECTIONS)
    for cid in (0, 17, NUM_CLASSES - 1):
        a = class_attributes(cid)
        assert class_id(a["shape"], a["color"], a["direction"]) == cid
    with pytest.raises(ValueError, match="unknown shape"):
        class_id("hexagon", "red", "left")
    with pytest.raises(ValueError, match="out of range"):
        class_attributes(NUM_CLASSES)


def test_captions_and_parsing():
    attrs = dict(shape="circle", color="red", direction="left", speed="slow", background="noise")
    assert caption(attrs) == "a red circle moving left"
    assert caption(attrs, detailed=True) == "a red circle moving left slowly on a dark noise background"
    assert parse_attributes(caption(attrs)) == dict(shape="circle", color="red", direction="left")
    assert parse_attributes("a blue diamond moving up left")["direction"] == "up-left"
    assert parse_attributes("down-right green square fast") == dict(
        shape="square", color="green", direction="down-right", speed="fast")
    assert parse_combo(("red", "circle", "left")) == ("red", "circle", "left")
    with pytest.raises(ValueError, match="unknown word"):
        parse_attributes("a purple circle moving left")
    with pytest.raises(ValueError, match="missing"):
        parse_combo("red circle")


def test_render_is_deterministic_per_seed():
    attrs = dict(shape="triangle", color="cyan", direction="up", speed="fast", background="noise")
    a = render_clip(attrs, 8, 32, 48, rng=5)
    assert a.shape == (8, 32, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_clip(attrs, 8, 32, 48, rng=5))
    assert not np.array_equal(a, render_clip(attrs, 8, 32, 48, rng=6))
    combos = combinations()
    c1, c2 = synth_clip(3, 11, combos, 8, 32, 32), synth_clip(3, 11, combos, 8, 32, 32)
    assert c1[0] == c2[0] and np.array_equal(c1[1], c2[1])
    assert not np.array_equal(c1[1], synth_clip(4, 11, combos, 8, 32, 32)[1])


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_motion_stays_inside_and_follows_direction(direction):
    rng = np.random.default_rng(0)
    for frames, (h, w), speed in itertools.product((2, 8, 32), ((12, 12), (32, 64), (128, 96)), ("slow", "fast")):
        r, cx, cy = plan_motion(direction, speed, frames, h, w, rng)
        assert cx.min() - r >= MARGIN - 1e-9 and cx.max() + r <= w - MARGIN + 1e-9
        assert cy.min() - r >= MARGIN - 1e-9 and cy.max() + r <= h - MARGIN + 1e-9
        vx, vy = DIRECTION_VECTORS[direction]
        dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
        assert np.sign(dx) == vx and np.sign(dy) == vy
    slow = [abs(plan_motion("right", "slow", 8, 64, 64, i)[1][-1] - plan_motion("right", "slow", 8, 64, 64, i)[1][0])
            for i in range(10)]
    fast = [abs(plan_motion("right", "fast", 8, 64, 64, i)[1][-1] - plan_motion("right", "fast", 8, 64, 64, i)[1][0])
            for i in range(10)]
    assert max(slow) < min(fast)


def test_object_pixels_never_touch_the_border():
    for i, background in enumerate(BACKGROUNDS * 4):
        attrs = dict(shape=SHAPES[i % 4], color="white", direction=DIRECTIONS[i % 8], speed="fast",
                     background=background)
        clip = render_clip(attrs, 12, 32, 40, rng=i).astype(np.int32)
        border = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], axis=1)  # (T, n, 3)
        assert border.max() < 120, "the white object reached the frame border"


def test_synth_folder_layout(tmp_path):
    out = tmp_path / "set"
    summary = synth_dataset(out, 30, frames=8, size=32, fps=8, seed=1, holdout=["red circle left"],
                            colors=["red", "green"], shapes=["circle", "square"])
    assert summary["count"] == 30 and summary["classes"] == 15   # 2 x 2 x 4 combinations, one held out
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"{i:06d}" for i in range(30)]
    for r in rows:
        assert (out / r["file"]).is_file()
        assert r["caption"] == caption(r)
        assert r["class_id"] == class_id(r["shape"], r["color"], r["direction"])
        assert (r["color"], r["shape"], r["direction"]) != ("red", "circle", "left") and not r["holdout"]
        assert r["speed"] in ("slow", "fast") and r["background"] in BACKGROUNDS
    # class-balanced: the first 15 samples hold each of the 15 combinations once
    assert len({r["class_id"] for r in rows[:15]}) == 15
    # a rerun with the same arguments reuses the clips; other arguments are refused
    assert synth_dataset(out, 30, frames=8, size=32, fps=8, seed=1, holdout=["red circle left"],
                         colors=["red", "green"], shapes=["circle", "square"])["count"] == 30
    with pytest.raises(ValueError, match="different synthetic set"):
        synth_dataset(out, 30, frames=8, size=32, seed=2)


def test_synth_never_writes_into_a_folder_it_did_not_make(tmp_path, monkeypatch):
    """A real data set's folder (its metadata.jsonl, its shard-000000.tar) is refused, untouched
    (was: both replaced by synthetic ones); a synthetic run killed half way resumes."""
    (tmp_path / "real" / "videos").mkdir(parents=True)
    (tmp_path / "real" / "metadata.jsonl").write_text('{"file": "videos/000000.mp4", "caption": "mine"}\n')
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "shard-000000.tar").write_bytes(b"my shard")
    for folder, layout in (("real", "folder"), ("raw", "shards")):
        before = {p: p.read_bytes() for p in (tmp_path / folder).rglob("*") if p.is_file()}
        with pytest.raises(ValueError, match="holds files that `ldm data synth` did not write"):
            synth_dataset(tmp_path / folder, 2, frames=8, size=32, layout=layout)
        assert {p: p.read_bytes() for p in (tmp_path / folder).rglob("*") if p.is_file()} == before

    import data.synth as synth
    real_clip, made = synth.synth_clip, []

    def dies_after_two(*args, **kwargs):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(args[1])
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(synth, "synth_clip", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        synth_dataset(tmp_path / "set", 4, frames=8, size=32, seed=3)
    assert json.loads((tmp_path / "set" / "synth.json").read_text())["spec"]["num"] == 4  # bound from the start
    monkeypatch.setattr(synth, "synth_clip", real_clip)
    assert synth_dataset(tmp_path / "set", 4, frames=8, size=32, seed=3)["count"] == 4
    assert synth_dataset(tmp_path / "fresh", 4, frames=8, size=32, seed=3)["count"] == 4
    for i in range(4):
        name = f"videos/{i:06d}.mp4"
        assert (tmp_path / "set" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert (tmp_path / "set" / "metadata.jsonl").read_text() == (tmp_path / "fresh" / "metadata.jsonl").read_text()


def test_any_subset_regenerates_identically(tmp_path):
    synth_dataset(tmp_path / "a", 6, frames=8, size=32, seed=4)
    synth_dataset(tmp_path / "b", 12, frames=8, size=32, seed=4)
    synth_dataset(tmp_path / "c", 6, frames=8, size=32, seed=5)
    meta = {k: (tmp_path / k / "metadata.jsonl").read_text().splitlines() for k in "abc"}
    assert meta["a"] == meta["b"][:6] and meta["a"] != meta["c"]
    for i in (0, 5):
        a = read_video(tmp_path / "a" / f"videos/{i:06d}.mp4", 8, 32, 32)
        b = read_video(tmp_path / "b" / f"videos/{i:06d}.mp4", 8, 32, 32)
        c = read_video(tmp_path / "c" / f"videos/{i:06d}.mp4", 8, 32, 32)
        assert a.equal(b) and not a.equal(c)


def test_holdout_can_be_included_and_is_marked(tmp_path):
    combos = combinations(holdout=["blue square up"], include_holdout=True, colors=["blue"], shapes=["square"])
    assert [c["holdout"] for c in combos] == [d == "up" for d in CARDINAL]
    with pytest.raises(ValueError, match="not among the selected"):
        combinations(holdout=["red circle left"], colors=["blue"])
    with pytest.raises(ValueError, match="every combination is held out"):
        combinations(holdout=["blue square up"], colors=["blue"], shapes=["square"], directions=["up"])


def test_synth_shards_layout(tmp_path):
    summary = synth_dataset(tmp_path, 7, frames=8, size=32, seed=2, layout="shards", shard_size=3,
                            diagonals=True)
    assert summary["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == summary["shards"] + ["synth.json"]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert sorted(names[:4]) == ["000000.cls", "000000.json", "000000.mp4", "000000.txt"]
        row = json.loads(tar.extractfile("000000.json").read())
        assert tar.extractfile("000000.txt").read().decode() == row["caption"]
        assert int(tar.extractfile("000000.cls").read()) == row["class_id"]
        assert read_video(tar.extractfile("000000.mp4").read(), 8, 32, 32).shape == (3, 8, 32, 32)
    assert len(names) == 12


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="frames must be >= 2"):
        synth_dataset(tmp_path, 2, frames=1)
    with pytest.raises(ValueError, match="layout"):
        synth_dataset(tmp_path, 2, layout="zip")
    with pytest.raises(ValueError, match="too small"):
        render_clip(dict(shape="circle", color="red", direction="left"), 4, 8, 8)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ldm data")
    data_cmd.add_arguments(parser)
    return parser.parse_args(argv)


def test_ldm_data_synth_and_list(tmp_path, capsys):
    out = tmp_path / "cli"
    args = _parse(["synth", "--output", str(out), "--num", "10", "--frames", "8", "--size", "32", "--fps", "4",
                   "--seed", "3", "--holdout", "red circle left", "--holdout", "green square up", "--quiet"])
    assert data_cmd.run(args) == 0
    text = capsys.readouterr().out
    assert "wrote 10 clips" in text and "held out (never emitted): green square up; red circle left" in text
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["fps"] == 4 and r["frames"] == 8 for r in rows)
    assert not any((r["color"], r["shape"], r["direction"]) in {("red", "circle", "left"), ("green", "square", "up")}
                   for r in rows)
    args = _parse(["synth", "--output", str(tmp_path / "sh"), "--num", "5", "--size", "32", "--frames", "8",
                   "--layout", "shards", "--shard-size", "2", "--diagonals", "--quiet"])
    assert data_cmd.run(args) == 0
    assert len(list((tmp_path / "sh").glob("shard-*.tar"))) == 3
    assert data_cmd.run(_parse(["list", "--input", str(out)])) == 0
    assert "10 videos" in capsys.readouterr().out
    # how many clips each video gives with `ldm extract`'s window settings (8 frames at 4 fps)
    assert data_cmd.run(_parse(["list", "--input", str(out), "--frames", "3", "--clip-stride", "2", "--show", "1"])) == 0
    text = capsys.readouterr().out
    assert ", 3 clips" in text and "30 clips of 3 frames from 10 videos; 0 without a clip\n" in text
    assert data_cmd.run(_parse(["list", "--input", str(out), "--frames", "3", "--fps", "2", "--clips-per-video", "2"])) == 0
    assert "20 clips of 3 frames at 2 fps" in capsys.readouterr().out   # 4 output frames: windows at 0 and 1
    assert data_cmd.run(_parse(["list", "--input", str(out), "--frames", "9"])) == 0
    assert "0 clips of 9 frames from 0 videos; 10 without a clip" in capsys.readouterr().out
    # user errors: one line on stderr, exit status 2, nothing created (`ldm` is launch.cli.console)
    assert console(["data", "list", "--input", str(out), "--frames", "3", "--clips-per-video", "2",
                    "--clip-stride", "2"]) == 2
    assert "ldm data list: error: --clips-per-video 2 spaces" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["synth", "--output", str(out)])   # --num is required
    capsys.readouterr()
    for flags, message in [(["--holdout", "red", "circle", "left"], "must name a color, a shape and a direction"),
                           (["--shard-size", "0", "--layout", "shards"], "shard_size must be >= 1, got 0"),
                           (["--size", "8"], "too small"), (["--fps", "0"], "fps must be > 0")]:
        assert console(["data", "synth", "--output", str(tmp_path / "bad"), "--num", "2", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "ldm data synth: error: " in err and message in err, err
    assert not (tmp_path / "bad").exists()
    assert console(["data", "list", "--input", str(tmp_path / "nowhere")]) == 2
    assert "ldm data list: error: input not found" in capsys.readouterr().err

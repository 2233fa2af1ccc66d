"""`ldm demo`: the quick pipeline runs every stage (2-rank extraction, 2-rank DeepSpeed ZeRO-2
training) and writes a complete, sane report; config and output-folder errors are clear."""
import json
import math
from pathlib import Path

import pytest

from launch.cli import main as ldm
from launch.demo import CONFIG_DIR, MARKER, _prepare_output, accuracy, check_config, load_config, run_demo
from ldm.errors import UserError

STAGES = ("synth", "train_ae", "eval_ae", "extract", "train_dit", "sample", "score", "report")
GROUPS = ("seen_text_class", "seen_text", "heldout_text")


def _check_accuracy(acc, n=None):
    for a in ("color", "direction", "shape", "all", "found"):
        assert 0.0 <= acc[a] <= 1.0, (a, acc)
    assert acc["color_chance"] == acc["direction_chance"] == acc["shape_chance"] == 0.5  # 2 of each in quick
    if n is not None:
        assert acc["n"] == n


@pytest.mark.dist
def test_quick_demo_writes_a_complete_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --output, from outside the checkout (the stages' processes
    out = Path("demo")           # ran in the checkout and did not find their configs)
    assert ldm(["demo", "--quick", "--output", str(out)]) == 0
    for name in ("report.md", "report.html", "report.json", "dit_loss.png", "ae_loss.png", "ae_reconstructions.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "report.json").read_text())
    cfg = load_config(CONFIG_DIR / "demo-quick.yaml")

    # every stage ran and was timed; the total covers them all
    assert all(r["timings_s"][s] > 0 for s in STAGES), r["timings_s"]
    assert r["timings_s"]["total"] >= sum(r["timings_s"][s] for s in STAGES) - 0.5
    # extraction and DiT training really ran on 2 ranks (manifest world size, one ZeRO-2 optimizer
    # partition per rank) for the configured number of steps
    assert r["extract"]["world_size"] == 2 and r["extract"]["written"] == cfg.synth.num
    assert r["extract"]["text_encoder"] == "builtin" and r["extract"]["text_dim"] > 0
    assert r["dit"]["zero_partitions"] == 2 and r["dit"]["deepspeed"] == "zero2"
    assert r["dit"]["steps"] == cfg.dit.steps and math.isfinite(r["dit"]["last_loss"])
    assert (out / "logs" / "extract.log").exists() and (out / "logs" / "train.log").exists()

    # the held-out combination never reached training, but was sampled and scored
    captions = {json.loads(line)["caption"] for line in (out / "work" / "videos" / "metadata.jsonl").read_text().splitlines()}
    assert "a red circle moving right" not in captions and len(captions) == 7
    assert set(r["accuracy"]) == set(GROUPS)
    _check_accuracy(r["accuracy"]["seen_text_class"], n=2)
    _check_accuracy(r["accuracy"]["heldout_text"], n=2)
    ae = r["autoencoder"]
    _check_accuracy(ae["reader_on_reconstructions"], n=8)
    assert ae["reader_on_clips"]["all"] == 1.0  # the reader is exact on real clips: the ceiling
    assert 5.0 < ae["psnr"] < 60.0 and 0.0 < ae["ssim"] <= 1.0 and "psnr_holdout" in ae

    # every video is on disk as MP4 + GIF and in both reports
    assert len(r["videos"]) == 6
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for v in r["videos"]:
        assert (out / v["mp4"]).stat().st_size > 0 and (out / v["gif"]).stat().st_size > 0
        assert v["gif"] in md and v["mp4"] in page
        assert set(v["read"]) >= {"color", "direction", "shape"} and set(v["correct"]) == {"color", "direction", "shape"}
    assert "<video" in page and "dit_loss.png" in md and "Stage timings" in md


def test_config_errors():
    quick = CONFIG_DIR / "demo-quick.yaml"
    with pytest.raises(ValueError, match="unknown key"):
        load_config(quick, ["sample.guidanse=3"])
    with pytest.raises(ValueError, match="outside synth"):
        load_config(quick, ["synth.holdout=[green circle left]"])
    with pytest.raises(ValueError, match="held-out"):
        load_config(quick, ["sample.seen=[red circle right]"])
    with pytest.raises(ValueError, match="subset"):
        load_config(quick, ["synth.directions=[up-left]"])
    load_config(CONFIG_DIR / "demo.yaml")  # the shipped full config is valid


def test_output_folder_must_be_new_or_a_demo(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not written by `ldm demo`"):
        run_demo(load_config(CONFIG_DIR / "demo-quick.yaml"), tmp_path)
    with pytest.raises(FileExistsError, match="not written by `ldm demo`"):
        _prepare_output(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / MARKER).exists()
    # a demo folder that does not record its settings (an earlier version) is replaced only when asked
    old = tmp_path / "old"
    old.mkdir()
    (old / MARKER).write_text("")
    (old / "report.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _prepare_output(old)
    assert (old / "report.json").exists()
    with pytest.raises(UserError, match=r"settings are not recorded\); give --overwrite"):
        check_config(load_config(CONFIG_DIR / "demo-quick.yaml"), old)
    _prepare_output(old, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == [MARKER]


@pytest.mark.dist
def test_an_interrupted_demo_resumes_without_redoing_its_finished_stages(tmp_path, monkeypatch):
    """Stopped in the DiT stage, the same demo keeps the stages done and resumes; a rerun after the
    end redoes nothing; other settings are refused, naming them; --overwrite starts again. The
    stages run in this process (the launched ranks are the quick demo's test): the stage
    bookkeeping is the same, without the seconds of three launches."""
    import launch.demo as demo
    from launch.pipeline import run_verb

    cfg = load_config(CONFIG_DIR / "demo-quick.yaml", ["ranks=1"])
    out = tmp_path / "d"
    monkeypatch.setattr(demo, "run_verb", lambda verb, config, log, **kw: run_verb(verb, config, log, in_process=True))

    def stop(*a):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(demo, "_train_dit", stop)
        with pytest.raises(KeyboardInterrupt):
            run_demo(cfg, out)
    done = ["synth", "train_ae", "eval_ae", "extract"]
    recorded = json.loads((out / "work" / "stages.json").read_text())
    assert sorted(recorded) == sorted(done)

    def redone(*a):
        raise AssertionError("a finished stage ran again")

    with monkeypatch.context() as m:
        for f in ("_synth", "_train_ae", "_eval_ae", "_extract"):
            m.setattr(demo, f, redone)
        r = run_demo(cfg, out)
    assert r["resumed"] == done and set(r["timings_s"]) >= set(STAGES)
    for s in done:  # the earlier run's numbers, in the report
        assert r["timings_s"][s] == recorded[s]["seconds"]
    assert r["autoencoder"]["psnr"] == recorded["eval_ae"]["result"]["psnr"]
    assert r["extract"]["written"] == cfg.synth.num and r["dit"]["steps"] == cfg.dit.steps
    assert "resumed: synth, train_ae, eval_ae, extract" in (out / "report.md").read_text()

    with monkeypatch.context() as m:  # after the end: nothing runs again, the same report
        for f in ("_synth", "_train_ae", "_eval_ae", "_extract", "_train_dit", "_sample"):
            m.setattr(demo, f, redone)
        again = run_demo(cfg, out)
    assert again["accuracy"] == r["accuracy"] and again["resumed"] == [*done, "train_dit", "sample", "score"]

    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserError, match=r"sample.steps: 2 -> 3\); give --overwrite"):
        run_demo(load_config(CONFIG_DIR / "demo-quick.yaml", ["ranks=1", "sample.steps=3"]), out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    with monkeypatch.context() as m:
        m.setattr(demo, "_synth", stop)
        with pytest.raises(KeyboardInterrupt):
            run_demo(load_config(CONFIG_DIR / "demo-quick.yaml", ["ranks=1", "sample.steps=3"]), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, ".lock", "run.json"]


def test_a_running_demo_s_folder_is_not_cleared_by_another(tmp_path):
    """`ldm demo --overwrite` (or the same command) into the folder of a demo still running is
    refused, naming it, and nothing is deleted (was: the running demo's folder was cleared under it)."""
    from procs import folder_held_by_another_process
    out = tmp_path / "d"
    out.mkdir()
    (out / MARKER).write_text("")
    (out / "report.json").write_text("{}")
    with folder_held_by_another_process(out):
        with pytest.raises(UserError, match="is in use by another run .*give a new --output"):
            run_demo(load_config(CONFIG_DIR / "demo-quick.yaml"), out, overwrite=True)
        assert (out / "report.json").read_text() == "{}"


def test_accuracy_counts_each_attribute_against_chance():
    cfg = load_config(CONFIG_DIR / "demo.yaml")
    want = {"color": "red", "shape": "circle", "direction": "left"}
    rows = [{"want": want, "read": {**want, "found": True}},
            {"want": want, "read": {**want, "shape": "square", "found": True}},
            {"want": want, "read": {"color": "blue", "shape": "square", "direction": "up", "found": False}}]
    acc = accuracy(rows, cfg.synth)
    assert acc["color"] == acc["direction"] == pytest.approx(2 / 3) and acc["shape"] == pytest.approx(1 / 3)
    assert acc["all"] == pytest.approx(1 / 3) and acc["found"] == pytest.approx(2 / 3) and acc["n"] == 3
    assert acc["color_chance"] == 0.25 and acc["shape_chance"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no videos"):
        accuracy([], cfg.synth)


def test_the_sampling_shift_follows_the_training_shift():
    """dit.flow.shift=3 alone would train at shift 3 and sample at the config's 1 (was: silently)."""
    with pytest.raises((ValueError, UserError), match=r"sample.shift 1 differs from dit.flow.shift 3.*sample.shift=3"):
        load_config(CONFIG_DIR / "demo-quick.yaml", ["dit.flow.shift=3"])
    assert load_config(CONFIG_DIR / "demo-quick.yaml", ["dit.flow.shift=3", "sample.shift=3"]).sample.shift == 3

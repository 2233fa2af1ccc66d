"""`ldm compare` end to end on CPU with debug configs: synthetic clips -> extraction -> the same DiT
trained per autoencoder -> reconstruction, sampling, attribute accuracy, cost -> compare.json/.md/png."""
import json
from pathlib import Path

import pytest
import torch

from launch.cli import main as ldm
from launch import list_models
from launch.cost import KEYS, cost_table
from ldm.errors import UserError

SMALL = ["--synth", "8", "--shapes", "circle", "--colors", "red", "blue", "--directions", "left", "right",
         "--frames", "9", "--height", "32", "--width", "32", "--dit-steps", "3", "--eval-clips", "2",
         "--sample-steps", "2", "--device", "cpu", "--train", "data.batch_size=4", "data.shuffle=8"]


def _report(out):
    return json.loads((out / "compare.json").read_text())


def test_compare_one_autoencoder(tmp_path, capsys):
    out = tmp_path / "cmp"
    ldm(["compare", "--autoencoders", "kl2d-f8c4-debug", "--output", str(out), *SMALL, "flow.shift=3"])
    r = _report(out)
    row, = r["rows"]
    assert row["attributes"]["sampling"]["shift"] == 3.0  # the DiT's training shift (was: 1.0 whatever it trained at)
    assert row["autoencoder"] == "kl2d-f8c4-debug" and row["random_weights"]
    assert row["extract"]["clips"] == 8 and row["dit"]["steps"] == 3 and row["dit"]["step_s_median"] > 0
    assert row["dit"]["peak_memory_bytes_measured"] is None  # CPU: the estimate only
    assert row["recon"]["clips"] == 2 and row["recon"]["psnr_db"]["mean"] > 0
    acc = row["attributes"]["accuracy"]
    assert acc["n"] == 4 and set(acc) == {"shape", "color", "direction", "all", "n"}  # 1 x 2 x 2 prompts
    assert row["attributes"]["chance"]["color"] == 0.5 and row["sample_s_per_video"] > 0
    # the cost row is `ldm cost` for the very DiT that was trained (class + text conditioning)
    c = row["cost"]
    assert set(KEYS) <= set(c) and c["tokens"] == 9 * 2 * 2 and c["dit"] == "dit-debug"
    from dit import load_export
    model, _ = load_export(out / "kl2d-f8c4-debug" / "dit")
    assert c["dit_params"] == model.num_parameters()
    manifest = json.loads((out / "kl2d-f8c4-debug" / "latents" / "manifest.json").read_text())
    ref, = cost_table(["kl2d-f8c4-debug"], 9, 32, 32, "dit-debug", batch_size=4, steps=2, cfg=True,
                      dit_overrides={"num_classes": model.config.num_classes, "text_dim": model.config.text_dim},
                      text_tokens=manifest["text_tokens"])
    assert ref["dit_forward_flops"] == c["dit_forward_flops"] and ref["sample_flops"] == c["sample_flops"]
    md = (out / "compare.md").read_text()
    assert "| kl2d-f8c4-debug (random weights) |" in md and "random weights" in md
    import autoencoders
    params = list_models.params_text(autoencoders.describe("kl2d-f8c4-debug")["params"])
    assert "| autoencoder | params | compression rate" in md and f"(random weights) | {params} | " in md
    assert f"2 clips of {out / 'data' / 'eval'} (held out)" in md
    assert (out / "cost.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "kl2d-f8c4-debug" / "recon_grid.png").exists()
    assert "compare finished" in capsys.readouterr().out
    assert "VCPR" not in md  # a fixed-rate autoencoder; a variable-rate one (MTC-VAE) gets its measured rates:
    row["recon"].update(vcpr={"mean": 512.0, "std": 128.0, "n": 2}, keyframe_accuracy={"mean": 0.75, "n": 2})
    from launch.compare import markdown
    assert "recon_grid.png; measured VCPR 512 (std 128), keyframe accuracy 75%" in markdown(r)


def test_compare_rejects_sizes_and_names_before_running(tmp_path):
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        ldm(["compare", "--autoencoders", "kl2d-f8c4-debug,causal3d-f4x8c4-debug", "--synth", "4",
             "--output", str(tmp_path / "x"), "--frames", "8"])
    with pytest.raises(UserError, match="neither a registered"):
        ldm(["compare", "--autoencoders", "nope", "--synth", "4", "--output", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # checked before any folder
    mine = tmp_path / "mine"  # a folder `ldm compare` did not write: refused, untouched
    mine.mkdir()
    (mine / "compare.md").write_text("my notes")
    with pytest.raises(UserError, match="not empty and holds no `ldm compare` run"):
        ldm(["compare", "--autoencoders", "kl2d-f8c4-debug", "--synth", "4", "--output", str(mine)])
    assert [p.name for p in mine.iterdir()] == ["compare.md"] and (mine / "compare.md").read_text() == "my notes"


def test_compare_saved_folders_on_plain_videos(tmp_path):
    """User videos (no synth.json: no attribute benchmark, a few samples timed) and saved
    autoencoder folders, labelled by folder (a train-ae RUN/final by its run)."""
    import autoencoders
    from data.synth import synth_dataset

    synth_dataset(tmp_path / "videos", num=6, frames=9, height=32, width=32, fps=8, seed=0)
    (tmp_path / "videos" / "synth.json").unlink()
    ae = autoencoders.build("kl2d-f8c4-debug")
    ae.save_pretrained(tmp_path / "mine")
    ae.save_pretrained(tmp_path / "run7" / "final", name="kl2d-f8c4-debug")
    out = tmp_path / "cmp"
    ldm(["compare", "--autoencoders", f"{tmp_path / 'mine'},{tmp_path / 'run7' / 'final'}", "--input",
         str(tmp_path / "videos"), "--output", str(out), *SMALL[SMALL.index("--frames"):]])
    mine, run7 = _report(out)["rows"]
    assert (mine["autoencoder"], run7["autoencoder"]) == ("mine", "run7")
    assert not mine["random_weights"] and mine["checkpoint"] == str(tmp_path / "mine")
    assert "attributes" not in mine and mine["sample_s_per_video"] > 0 and mine["recon"]["clips"] == 2
    assert mine["recon"]["input_clips"]["chosen"] == "random 2 of 6 (seed 0)"  # as FVD's (was: the first 2)
    assert (out / "mine" / "latents" / "manifest.json").is_file() and (out / "run7" / "dit").is_dir()
    # the quality columns come from the training clips here: the report says so (was: not a word)
    md = (out / "compare.md").read_text()
    assert f"2 clips of {tmp_path / 'videos'} (the training videos, NOT held out: give --eval-input" in md
    # only the columns something was measured for (was: LPIPS, rFVD, attributes and FVD all "-"), the read rate said
    header = next(line for line in md.splitlines() if line.startswith("| autoencoder"))
    assert header.endswith("| PSNR dB | SSIM |") and "compression rate (latent / input)" in header
    assert "Clips 9x32x32, each at its video's own frame rate (no --fps);" in md and "FVD's reference" not in md
    r = _report(out)  # all at 8 fps: no word; videos at mixed or variable rates: said under the table
    assert r["data"]["source_fps"] == {"8": 6} and r["data"]["variable_rate"] == [] and "source frame rates" not in md
    from launch.compare import markdown
    r["data"].update(source_fps={"30": 4, "24": 2}, variable_rate=["phone"])
    assert "Training videos' source frame rates (read at their own rates: one motion spans different numbers of " \
           "frames; --fps F resamples them): 30 fps: 4 clips, 24 fps: 2 clips; variable frame rate: phone." \
        in markdown(r)


@pytest.mark.slow
def test_compare_two_autoencoders_trained_first_with_fvd_and_lpips(tmp_path):
    """The full flagship path: two families, each autoencoder trained briefly, rFVD / FVD from a
    scripted extractor file, LPIPS from weight files."""
    from test_evaluate import TinyI3D

    from ldm.metrics import LPIPS

    torch.jit.save(torch.jit.script(TinyI3D()), str(tmp_path / "i3d_torchscript.pt"))
    lp = LPIPS("alex")
    torch.save({f"features.{k}": v for k, v in lp.features.state_dict().items()}, tmp_path / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand_like(h.weight) for i, h in enumerate(lp.heads)},
               tmp_path / "alex.pth")
    out = tmp_path / "cmp"
    args = [a if a != "8" else "12" for a in SMALL]
    ldm(["compare", "--autoencoders", "kl2d-f8c4-debug,causal3d-f4x8c4-debug", "--output", str(out), *args,
         "--ae-steps", "2", "--i3d", str(tmp_path / "i3d_torchscript.pt"), "--fvd-frames", "8",
         "--lpips-net", "alex", "--lpips-backbone", str(tmp_path / "alexnet.pth"), "--lpips-heads",
         str(tmp_path / "alex.pth")])
    r = _report(out)
    kl, c3 = r["rows"]
    assert not kl["random_weights"] and kl["ae_training"]["steps"] == 2
    assert c3["cost"]["tokens"] == 3 * 2 * 2 < kl["cost"]["tokens"]
    for row in (kl, c3):
        assert row["recon"]["rfvd"]["n_real"] == 2 and row["recon"]["lpips"]["mean"] > 0
        assert row["fvd"]["n_fake"] == 2 and row["fvd"]["sha256"]
    assert "| causal3d-f4x8c4-debug |" in (out / "compare.md").read_text()


def test_an_interrupted_compare_resumes_without_redoing_finished_stages(tmp_path, monkeypatch):
    """Stopped in the second autoencoder's DiT training, the same command keeps what was finished
    (the first autoencoder's every stage, the second's extraction) and reports the first run's
    numbers for them; after the end a rerun redoes nothing (was: every stage ran again, the report's
    training seconds became the resumed run's)."""
    import launch.compare as compare

    out = tmp_path / "cmp"
    cmd = ["compare", "--autoencoders", "kl2d-f8c4-debug,kl2d-f8c16-debug", "--output", str(out), *SMALL]
    real = {f: getattr(compare, f) for f in ("_extract", "_train_dit", "_recon", "_generate")}

    def second_training_stops(args, work):
        if work.name == "kl2d-f8c16-debug":
            raise KeyboardInterrupt
        return real["_train_dit"](args, work)

    with monkeypatch.context() as m:
        m.setattr(compare, "_train_dit", second_training_stops)
        with pytest.raises(KeyboardInterrupt):
            ldm(cmd)
    first = json.loads((out / "kl2d-f8c4-debug" / "stages.json").read_text())
    assert sorted(first) == ["cost", "extract", "generate", "recon", "train_dit"]
    assert list(json.loads((out / "kl2d-f8c16-debug" / "stages.json").read_text())) == ["extract"]

    def only_the_second(name):
        def stage(*a):
            assert "kl2d-f8c16-debug" in str(a), f"{name} of a finished autoencoder ran again"
            return real[name](*a)
        return stage

    with monkeypatch.context() as m:
        m.setattr(compare, "_extract", lambda *a: pytest.fail("a finished extraction ran again"))
        for name in ("_train_dit", "_recon", "_generate"):
            m.setattr(compare, name, only_the_second(name))
        ldm(cmd)
    kl4, kl16 = _report(out)["rows"]
    assert kl4["resumed"] == ["extract", "train_dit", "recon", "generate", "cost"] and kl16["resumed"] == ["extract"]
    assert kl4["dit"] == first["train_dit"]["result"] and kl4["recon"] == first["recon"]["result"]["recon"]
    assert kl16["dit"]["steps"] == 3 and kl16["attributes"]["accuracy"]["n"] == 4

    with monkeypatch.context() as m:
        for name in real:
            m.setattr(compare, name, lambda *a: pytest.fail("a finished stage ran again"))
        m.setattr(compare.costlib, "cost_table", lambda *a, **k: pytest.fail("a cost row was counted again"))
        ldm(cmd)
    assert [r["dit"] for r in _report(out)["rows"]] == [kl4["dit"], kl16["dit"]]
    assert [r["cost"] for r in _report(out)["rows"]] == [kl4["cost"], kl16["cost"]]


def test_a_running_comparisons_folder_is_refused(tmp_path):
    """A second `ldm compare` into the folder of one still running is refused in one line naming
    it, before anything is written (was: both wrote the same report and trained into the same
    folders; only the training stage's own lock stopped one, half way)."""
    from launch import runs
    from procs import folder_held_by_another_process
    out = tmp_path / "cmp"
    with folder_held_by_another_process(out):
        with pytest.raises(UserError, match="is in use by another run .*give a new --output"):
            ldm(["compare", "--autoencoders", "kl2d-f8c4-debug", "--output", str(out), *SMALL])
        assert [p.name for p in out.iterdir()] == [runs.LOCK]


def test_compare_adds_rfid_and_first_frame_to_a_finished_comparison(tmp_path, capsys, monkeypatch):
    """`--inception` (rFID) and `--first-frame` do not bind the folder, and adding one redoes only
    each autoencoder's recon stage: extraction, DiT and sampling kept (was: neither flag in
    `ldm compare`, then the whole evaluation, sampling and attribute benchmark included, ran again);
    `--first-frame` with no autoencoder that decodes with a first frame is refused in one line."""
    from test_evaluate import TinyInception

    import launch.compare as compare
    from launch.compare import markdown

    torch.jit.save(torch.jit.script(TinyInception()), str(tmp_path / "inception-2015-12-05.pt"))
    out = tmp_path / "cmp"
    argv = ["compare", "--autoencoders", "kl2d-f8c4-debug", "--output", str(out), *SMALL]
    ldm(argv)
    md = (out / "compare.md").read_text()
    assert "rFID" not in md and "first-frame" not in md
    assert not {"--inception", "--first-frame"} & set(json.loads((out / "run.json").read_text())["record"])
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(compare, "_generate", lambda *a: pytest.fail("sampling ran again for a recon flag"))
        ldm(argv + ["--inception", str(tmp_path / "inception-2015-12-05.pt")])
    printed = capsys.readouterr().out
    assert "extract done by an earlier run" in printed and "train_dit done by an earlier run" in printed
    assert "recon again: --inception added" in printed and "recon done in" in printed
    assert "generate done by an earlier run" in printed
    row, = _report(out)["rows"]
    assert row["recon"]["rfid"]["n_real"] == 2 * 9 and row["resumed"] == ["extract", "train_dit", "generate", "cost"]
    assert row["attributes"]["accuracy"]["n"] == 4  # the earlier run's, kept
    md = (out / "compare.md").read_text()
    header, rule, line = [m for m in md.splitlines() if m.startswith("|")]
    assert "| SSIM | rFID | attributes" in header and header.count("|") == rule.count("|") == line.count("|")
    assert "rFID over 18 frames a side, fewer than FID's 50000: biased upward" in md
    with pytest.raises(UserError, match="--first-frame: none of --autoencoders decodes with a first frame"):
        ldm(argv + ["--first-frame"])
    # an H3AE row decodes with the first frame, the others plainly: said per row and under the table
    r = _report(out)
    r["settings"]["first_frame"] = True
    r["rows"].append({**row, "autoencoder": "h3ae", "random_weights": False,
                      "recon": {**row["recon"], "first_frame": True}})
    md = markdown(r)
    assert "| h3ae (first-frame decode) |" in md
    assert "kl2d-f8c4-debug cannot decode with one and decoded plainly" in md

    # FloLPIPS (`--flow-net`, with the LPIPS files): the recon stage again, its column beside LPIPS
    from test_evaluate import _TinyFlow

    from ldm.metrics import LPIPS
    torch.jit.save(torch.jit.script(_TinyFlow()), str(tmp_path / "flow.pt"))
    lp = LPIPS("alex")
    torch.save({f"features.{k}": v for k, v in lp.features.state_dict().items()}, tmp_path / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand_like(h.weight) for i, h in enumerate(lp.heads)},
               tmp_path / "alex.pth")
    lpips = ["--lpips-net", "alex", "--lpips-backbone", str(tmp_path / "alexnet.pth"), "--lpips-heads",
             str(tmp_path / "alex.pth")]
    with pytest.raises(UserError, match="--flow-net adds FloLPIPS, LPIPS weighted by where the motion differs"):
        ldm(argv + ["--flow-net", str(tmp_path / "flow.pt")])
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(compare, "_generate", lambda *a: pytest.fail("sampling ran again for a recon flag"))
        ldm(argv + ["--inception", str(tmp_path / "inception-2015-12-05.pt"), *lpips, "--flow-net",
                    str(tmp_path / "flow.pt")])
    assert "--flow-net added" in capsys.readouterr().out
    row, = _report(out)["rows"]
    assert row["recon"]["flolpips"]["n"] == 2 and row["recon"]["flolpips"]["flow_net"] == "flow.pt"
    md = (out / "compare.md").read_text()
    assert "| SSIM | LPIPS | FloLPIPS | rFID |" in md and "Reconstruction (PSNR, SSIM, LPIPS, FloLPIPS, rFID)" in md


def _as_before_the_split(out, label):
    """``out`` as `ldm compare` left it before its evaluation flags were stage keys: one evaluate
    stage per autoencoder (recording --inception / --first-frame in its `eval_key`) and every other
    evaluation flag bound in run.json."""
    from launch.compare import EVAL_ONLY

    stages_file = out / label / "stages.json"
    stages = json.loads(stages_file.read_text())
    recon, generate = stages.pop("recon"), stages.pop("generate")
    stages["evaluate"] = {"seconds": recon["seconds"] + generate["seconds"], "result": {
        **recon["result"], **generate["result"], "eval_key": {"inception_sha256": None, "first_frame": False}}}
    stages_file.write_text(json.dumps(stages))
    binding = json.loads((out / "run.json").read_text())
    settings = _report(out)["settings"]
    binding["record"].update({f: settings[f[2:].replace("-", "_")] for f in EVAL_ONLY
                              if f not in ("--inception", "--first-frame")})
    (out / "run.json").write_text(json.dumps(binding))


def test_a_changed_evaluation_flag_redoes_only_what_it_affects(tmp_path, capsys, monkeypatch):
    """The evaluation flags do not bind a comparison's folder: `--sample-steps` redoes sampling and
    the attribute benchmark only, `--eval-clips` the reconstruction too (a held-out set of that
    size drawn), extraction and DiT kept (was: refused, give a new --output: everything from scratch).
    A folder from before (one evaluate stage, the flags in run.json) resumes: the same command redoes
    nothing. Sampling again clears the earlier samples (was: another --per-prompt's left beside);
    stopped while sampling again, the earlier sampling result is forgotten (was: kept, for samples
    partly overwritten)."""
    import launch.compare as compare

    out = tmp_path / "cmp"
    argv = ["compare", "--autoencoders", "kl2d-f8c4-debug", "--output", str(out), *SMALL]
    ldm(argv)
    first, = _report(out)["rows"]
    _as_before_the_split(out, "kl2d-f8c4-debug")
    capsys.readouterr()
    with monkeypatch.context() as m:
        for name in ("_extract", "_train_dit", "_recon", "_generate"):
            m.setattr(compare, name, lambda *a: pytest.fail("a finished stage of an earlier version ran again"))
        ldm(argv)
    row, = _report(out)["rows"]
    assert row["resumed"] == ["extract", "train_dit", "recon", "generate", "cost"]
    assert row["recon"] == first["recon"] and row["attributes"] == first["attributes"]

    (out / "kl2d-f8c4-debug" / "samples" / "000-red-circle-left-1.mp4").write_bytes(b"")  # as --per-prompt 2 left
    with monkeypatch.context() as m:
        m.setattr(compare, "_recon", lambda *a: pytest.fail("reconstruction ran again for a sampling flag"))
        ldm([*argv, "--sample-steps", "3"])
    printed = capsys.readouterr().out
    assert "generate again: --sample-steps changed (2 -> 3)" in printed
    assert "cost again: --sample-steps changed (2 -> 3)" in printed  # sampling's FLOPs are per step
    assert len(list((out / "kl2d-f8c4-debug" / "samples").iterdir())) == 4  # this run's samples only
    row, = _report(out)["rows"]
    assert row["attributes"]["sampling"]["steps"] == 3 and row["recon"] == first["recon"]
    assert row["resumed"] == ["extract", "train_dit", "recon"]

    ldm([*argv, "--sample-steps", "3", "--eval-clips", "3"])
    printed = capsys.readouterr().out
    assert "recon again: --eval-clips changed (2 -> 3)" in printed and "generate done by an earlier run" in printed
    row, = _report(out)["rows"]
    assert row["recon"]["clips"] == 3 and row["resumed"] == ["extract", "train_dit", "generate", "cost"]
    assert f"3 clips of {out / 'data' / 'eval-3'} (held out)" in (out / "compare.md").read_text()

    def stopped(*a):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # Ctrl-C while sampling again: the result the samples no longer match is gone
        m.setattr(compare, "_generate", stopped)
        with pytest.raises(KeyboardInterrupt):
            ldm([*argv, "--sample-steps", "4", "--eval-clips", "3"])
    # the cost row of --sample-steps 3 stays: a cost stage keyed with 4 counts it again
    assert sorted(json.loads((out / "kl2d-f8c4-debug" / "stages.json").read_text())) == ["cost", "extract", "recon",
                                                                                          "train_dit"]

    # a reconstruction read by an earlier version of the video reading (its key has no "reading") is measured again,
    # the others kept: the rows of one table read their clips alike
    stages = json.loads((out / "kl2d-f8c4-debug" / "stages.json").read_text())
    del stages["recon"]["key"]["reading"]
    (out / "kl2d-f8c4-debug" / "stages.json").write_text(json.dumps(stages))
    capsys.readouterr()
    ldm([*argv, "--sample-steps", "4", "--eval-clips", "3"])
    assert "recon again: reading added" in capsys.readouterr().out
    row, = _report(out)["rows"]
    assert row["resumed"] == ["extract", "train_dit"] and row["recon"]["clips"] == 3


def test_an_autoencoder_that_fails_is_reported_and_the_others_go_on(tmp_path, capsys, monkeypatch):
    """One of two autoencoders failing (out of memory, unreadable weights) leaves it out of the report,
    which names it and its error, with its traceback in its folder's error.log, and exits 1 (was: a
    traceback and no report at all, the other autoencoder's finished work unseen)."""
    import launch.compare as compare

    real = compare._extract

    def second_fails(entry, *a):
        if entry["label"] == "kl2d-f8c16-debug":
            raise RuntimeError("CUDA out of memory\nmore lines")
        return real(entry, *a)

    monkeypatch.setattr(compare, "_extract", second_fails)
    out = tmp_path / "cmp"
    assert ldm(["compare", "--autoencoders", "kl2d-f8c4-debug,kl2d-f8c16-debug", "--output", str(out), *SMALL]) == 1
    r = _report(out)
    assert [row["autoencoder"] for row in r["rows"]] == ["kl2d-f8c4-debug"]
    assert r["failed"] == [{"autoencoder": "kl2d-f8c16-debug", "error": "RuntimeError: CUDA out of memory",
                            "log": str(out / "kl2d-f8c16-debug" / "error.log")}]
    assert "in second_fails" in (out / "kl2d-f8c16-debug" / "error.log").read_text()
    assert "**kl2d-f8c16-debug failed** (RuntimeError: CUDA out of memory): not in the table" in \
        (out / "compare.md").read_text()
    err = capsys.readouterr().err
    assert "ldm compare: kl2d-f8c16-debug failed (RuntimeError: CUDA out of memory), left out of the report" in err

    # the same command again: only the failed autoencoder's stages run, the report has both rows and the
    # stale error.log goes (was: kept beside a row that no longer failed)
    cmd = ["compare", "--autoencoders", "kl2d-f8c4-debug,kl2d-f8c16-debug", "--output", str(out), *SMALL]
    redone = []

    def recorded(name, real):
        def stage(*a):
            redone.append((name, [x.name for x in a if isinstance(x, Path)]))  # its autoencoder's folder
            return real(*a)
        return stage

    monkeypatch.setattr(compare, "_extract", recorded("_extract", real))
    for name in ("_train_dit", "_recon", "_generate"):
        monkeypatch.setattr(compare, name, recorded(name, getattr(compare, name)))
    assert ldm(cmd) == 0
    r = _report(out)
    assert [row["autoencoder"] for row in r["rows"]] == ["kl2d-f8c4-debug", "kl2d-f8c16-debug"] and r["failed"] == []
    assert r["rows"][0]["resumed"] == ALL_STAGES and r["rows"][1]["resumed"] == []
    assert redone == [(name, ["kl2d-f8c16-debug"]) for name in ("_extract", "_train_dit", "_recon", "_generate")]
    assert not (out / "kl2d-f8c16-debug" / "error.log").exists() and "failed" not in (out / "compare.md").read_text()


def _files(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_replaced_weights_are_refused_until_overwrite_starts_the_folder_again(tmp_path, capsys):
    """An autoencoder folder whose weights were replaced (after a failed or wrong checkpoint): the rerun
    is refused in one line naming it and `--overwrite`, before anything is touched; `--overwrite`
    removes the earlier comparison's outputs only (a file of the user's stays) and runs every stage
    again; it binds nothing: the same command without it resumes (was: no `--overwrite`, the refusal
    said only `give a new --output`: the finished folder could only be deleted by hand)."""
    import autoencoders
    from launch.compare import TRASH

    torch.manual_seed(0)
    autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / "mine")
    out = tmp_path / "cmp"
    cmd = ["compare", "--autoencoders", str(tmp_path / "mine"), "--output", str(out), *SMALL]
    ldm(cmd)
    (out / "notes.txt").write_text("mine")
    torch.manual_seed(1)
    autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / "mine")  # other weights, same folder
    before = _files(out)
    with pytest.raises(UserError, match=f"row mine: {tmp_path / 'mine'} holds other weights than the row was made "
                       "with\\); give --redo mine .*, --overwrite to start the comparison again, or a new --output$"):
        ldm(cmd)
    assert _files(out) == before  # refused before anything: not a byte or a time stamp changed
    (out / TRASH / "mine").mkdir(parents=True)  # what an --overwrite interrupted while removing leaves
    capsys.readouterr()
    ldm(cmd + ["--overwrite"])
    err = capsys.readouterr().err
    assert f"--overwrite: removed the earlier comparison from {out} (mine, data, compare.json, compare.md, cost.png, " \
           "run.json); kept what it did not write: notes.txt" in err
    row, = _report(out)["rows"]
    assert row["resumed"] == [] and (out / "notes.txt").read_text() == "mine" and not (out / TRASH).exists()
    assert json.loads((out / "mine" / "row.json").read_text())["record"]["weights"] != \
        json.loads(before["mine/row.json"][0])["record"]["weights"]
    ldm(cmd)
    assert _report(out)["rows"][0]["resumed"] == ALL_STAGES


def test_overwrite_refuses_another_verbs_folder_and_inputs_it_would_remove(tmp_path):
    """`--overwrite` removes nothing it did not write and no input of the comparison: a folder of
    another verb's run, videos or an autoencoder (one `--ae-steps` trained) inside the earlier
    comparison's outputs are refused in one line before anything is touched."""
    from data.synth import synth_dataset
    import autoencoders

    other = tmp_path / "dit-run"  # `ldm train`'s run.json
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"format": 1, "record": {"steps": 3}, "changes": []}))
    cmd = ["compare", "--autoencoders", "kl2d-f8c4-debug", *SMALL[2:]]
    for overwrite in ([], ["--overwrite"]):  # (was, without it: refused as a comparison, every key listed)
        with pytest.raises(UserError, match="its run.json is not an `ldm compare` run's"):
            ldm([*cmd, *overwrite, "--synth", "4", "--output", str(other)])
    assert [p.name for p in other.iterdir()] == ["run.json"]
    out = tmp_path / "cmp"  # an earlier comparison: its synthetic clips and an autoencoder it trained
    (out / "data").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"format": 1, "record": {"--autoencoders": "kl2d-f8c4-debug"}}))
    synth_dataset(out / "data" / "train", num=2, frames=9, height=32, width=32, fps=8, seed=0)
    autoencoders.build("kl2d-f8c4-debug").save_pretrained(out / "kl2d-f8c4-debug" / "ae" / "final")
    before = _files(out)
    with pytest.raises(UserError, match=f"--input {out / 'data' / 'train'} lies inside {out / 'data'}, which "
                       "--overwrite removes"):
        ldm([*cmd, "--overwrite", "--input", str(out / "data" / "train"), "--output", str(out)])
    trained = out / "kl2d-f8c4-debug" / "ae" / "final"
    with pytest.raises(UserError, match=f"--autoencoders {trained} lies inside {out / 'kl2d-f8c4-debug'}"):
        ldm(["compare", "--autoencoders", str(trained), *SMALL, "--overwrite", "--output", str(out)])
    assert _files(out) == before


STAGE_FUNCTIONS = ("_extract", "_train_dit", "_recon", "_generate")
ALL_STAGES = ["extract", "train_dit", "recon", "generate", "cost"]


def _recording(monkeypatch):
    """Each stage function of `launch.compare` records (its name, the row folder it runs for), then runs."""
    import launch.compare as compare

    ran = []
    for name in STAGE_FUNCTIONS:
        def stage(*a, name=name, real=getattr(compare, name)):
            ran.append((name, next(x.name for x in a if isinstance(x, Path))))
            return real(*a)
        monkeypatch.setattr(compare, name, stage)
    return ran


def test_adding_an_autoencoder_runs_only_its_row_and_leaving_one_out_keeps_its_folder(tmp_path, capsys, monkeypatch):
    """A rerun with one more autoencoder runs that row's stages only, the finished rows kept (was: refused,
    `--autoencoders` bound the folder: only --overwrite, every row trained again); a rerun with fewer
    reports only those given, says in one line which earlier rows it left out, and deletes nothing; given
    again, such a row is reported again with nothing run."""
    out = tmp_path / "cmp"
    a, b = "kl2d-f8c4-debug", "kl2d-f8c16-debug"

    def cmd(*names):
        return ["compare", "--autoencoders", ",".join(names), "--output", str(out), *SMALL]

    ldm(cmd(a))
    first, = _report(out)["rows"]
    ran = _recording(monkeypatch)
    ldm(cmd(a, b))
    assert ran == [(name, b) for name in STAGE_FUNCTIONS]
    rows = _report(out)["rows"]
    assert [r["autoencoder"] for r in rows] == [a, b]
    assert rows[0]["resumed"] == ALL_STAGES and rows[1]["resumed"] == [] and rows[0]["dit"] == first["dit"]

    ran.clear()
    capsys.readouterr()
    ldm(cmd(b))
    assert ran == []
    assert [r["autoencoder"] for r in _report(out)["rows"]] == [b]
    err = [line for line in capsys.readouterr().err.splitlines() if a in line]
    assert err == [f"ldm compare: left out of the report (not in --autoencoders), kept on disk: {out / a}"]
    md = (out / "compare.md").read_text()
    assert f"| {a}" not in md and f"Earlier rows kept in this folder, not in this report: {a}." in md
    assert sorted(json.loads((out / a / "stages.json").read_text())) == sorted(ALL_STAGES)  # nothing deleted

    ldm(cmd(b, a))  # given again: reported again, in the order given, nothing run
    assert ran == [] and [r["autoencoder"] for r in _report(out)["rows"]] == [b, a]
    assert "Earlier rows" not in (out / "compare.md").read_text()


def _as_bound_before_rows(out, flag, weights):
    """``out`` as `ldm compare` bound it before each row was bound on its own: run.json holds the whole
    ``--autoencoders`` value and each folder's weights hash (``weights``: label -> `dir_hash`), no row has a
    row.json."""
    binding = json.loads((out / "run.json").read_text())
    binding["record"]["--autoencoders"] = flag
    binding["record"].update({f"autoencoder_weights.{label}": h for label, h in weights.items()})
    (out / "run.json").write_text(json.dumps(binding))
    for row in out.iterdir():
        if row.is_dir():
            (row / "row.json").unlink(missing_ok=True)


def test_replaced_weights_refuse_their_row_and_redo_runs_only_that_row(tmp_path, capsys, monkeypatch):
    """A folder written before rows were bound one by one (the whole list in run.json) resumes as it did;
    an autoencoder folder whose weights were replaced is refused in one line naming its row and
    `--redo LABEL` (was: naming --overwrite only, which trains every row again), in a folder bound either
    way; `--redo LABEL` redoes that row's stages only, the others kept; a label not among the rows is refused."""
    import autoencoders
    from ldm.checkpoint import dir_hash

    torch.manual_seed(0)
    autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / "mine")
    out = tmp_path / "cmp"
    flag = f"kl2d-f8c16-debug,{tmp_path / 'mine'}"
    cmd = ["compare", "--autoencoders", flag, "--output", str(out), *SMALL]
    ldm(cmd)
    first = _report(out)["rows"]
    made_with = dir_hash(tmp_path / "mine")
    _as_bound_before_rows(out, flag, {"mine": made_with})
    ran = _recording(monkeypatch)
    ldm(cmd)  # the earlier binding resumes: nothing runs again
    assert ran == [] and [r["resumed"] for r in _report(out)["rows"]] == [ALL_STAGES, ALL_STAGES]
    assert [r["dit"] for r in _report(out)["rows"]] == [r["dit"] for r in first]

    torch.manual_seed(1)
    autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / "mine")  # other weights, same folder
    before = _files(out)
    for bound in ("by its row.json", "before rows were"):
        if bound == "before rows were":
            _as_bound_before_rows(out, flag, {"mine": made_with})
            before = _files(out)
        with pytest.raises(UserError, match=f"^{out} holds rows made from other autoencoders \\(row mine: "
                           f"{tmp_path / 'mine'} holds other weights than the row was made with\\); give --redo mine "
                           "to redo that row only \\(the other rows kept\\), --overwrite to start the comparison "
                           "again, or a new --output$"):
            ldm(cmd)
        assert _files(out) == before and ran == []  # refused before anything
    with pytest.raises(UserError, match="--redo theirs: not a row of this comparison \\(its rows: "
                       "kl2d-f8c16-debug, mine\\)"):
        ldm([*cmd, "--redo", "theirs"])
    capsys.readouterr()
    ldm([*cmd, "--redo", "mine"])
    assert ran == [(name, "mine") for name in STAGE_FUNCTIONS]
    assert f"--redo: removed the earlier row mine ({out / 'mine'})" in capsys.readouterr().err
    kl16, mine = _report(out)["rows"]
    assert kl16["resumed"] == ALL_STAGES and mine["resumed"] == [] and kl16["dit"] == first[0]["dit"]
    assert json.loads((out / "mine" / "row.json").read_text())["record"] == {  # bound to the new weights now
        "autoencoder": None, "weights": dir_hash(tmp_path / "mine")}


def test_a_rerun_keeps_each_rows_label_when_another_autoencoder_shares_its_name(tmp_path):
    """Two autoencoders of one folder name are numbered (0-model, 1-model): adding, leaving out or
    reordering autoencoders keeps each earlier row's label, found by its weights or folder, so its row
    resumes (was: every label renumbered by position: every row a new folder, trained again, the
    finished ones left out); a new autoencoder gets a label no row of this run has."""
    import autoencoders
    from launch.compare import _bind_rows, _entries, _keep_labels, _row_record

    for i, folder in enumerate(["a/model", "b/model", "c/model", "d/other"]):
        torch.manual_seed(i)
        autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / folder)
    out = tmp_path / "cmp"
    left_out = []

    def labels(*folders, bind=False):
        entries = _entries(",".join(str(tmp_path / f) if "/" in f else f for f in folders))
        for e in entries:
            e["row"] = _row_record(e)
        _keep_labels(out, entries)
        if bind:
            left_out[:] = _bind_rows(out, entries)
        return [e["label"] for e in entries]

    assert labels("a/model", "kl2d-f8c4-debug", bind=True) == ["model", "kl2d-f8c4-debug"]  # no number: none shared
    assert labels("kl2d-f8c4-debug", "b/model", "a/model", bind=True) == ["kl2d-f8c4-debug", "1-model", "model"]
    assert labels("b/model", "c/model", "d/other") == ["1-model", "0-model", "2-other"]  # as a first run numbers
    assert labels("c/model", "b/model", bind=True) == ["0-model", "1-model"]
    assert left_out == []  # the rows of a/model and kl2d-f8c4-debug never started: nothing to say
    (out / "model" / "stages.json").write_text("{}")
    assert labels("c/model", "b/model", bind=True) == ["0-model", "1-model"] and left_out == ["model"]
    torch.manual_seed(9)
    autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / "a" / "model")  # replaced weights: its label,
    assert labels("a/model", "c/model") == ["model", "0-model"]  # then refused as that row's (`_check_rows`)
    import shutil
    shutil.copytree(tmp_path / "c" / "model", tmp_path / "e" / "model")  # a copy of c's weights, given first
    assert labels("e/model", "c/model") == ["2-model", "0-model"]  # c keeps its row, found by weights and folder

"""FLOP counting (attention included, on CPU), the analytic cross-check, memory without allocating,
the replay of repeated decoder steps, and `ldm cost`."""
import contextlib
import dataclasses
import json
import resource
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dit
from launch.cli import main as ldm
from launch import list_models
from launch.cost import KEYS, cost_table, format_table
from ldm.cost import (CATEGORIES, adam_model_state_bytes, count_flops, dit_forward_flops_analytic, dit_trunk_flops,
                      fake_mode, prime_optimizer, train_step_memory)
from ldm.errors import UserError
from ldm.latent import Cond


def test_sdpa_on_cpu_is_counted():
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0  # the bug this module fixes
    out, fwd = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert fwd.total == 4 * 2 * 3 * 10 * 10 * 8  # QK^T and PV, 2 x MAC each
    _, bwd = count_flops(lambda: out.sum().backward())
    assert bwd.total == int(2.5 * fwd.total)  # scores recomputed + four products


def _tiny_dit(text_dim=0):
    return dit.make_config("dit-debug", {"z": (4, 3, 8, 8), "g": (2, 5, 6)}, text_dim=text_dim)


@pytest.mark.parametrize("text_dim", [0, 12])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_dit_forward_flops_equal_the_closed_form(backend, text_dim):
    cfg = _tiny_dit(text_dim)
    with fake_mode():
        model = dit.VideoDiT(cfg)
        model.set_attention_backend(backend)
        x = {"z": torch.randn(1, 4, 3, 8, 8), "g": torch.randn(1, 2, 5, 6)}
        cond = Cond(text=torch.randn(1, 7, text_dim)) if text_dim else None
        _, count = count_flops(lambda: model(x, torch.rand(1), cond))
    groups = [(3 * 4 * 4, 4 * 2 * 2), (2 * 5, 6)]  # (tokens, features) per group: patch (1, 2, 2); token set
    expect = dit_forward_flops_analytic(cfg.depth, cfg.hidden, groups, cfg.mlp_ratio, cfg.freq_dim,
                                        7 if text_dim else 0, text_dim)
    assert count.total == expect
    attn = "aten.bmm" if backend == "math" else "aten._scaled_dot_product_flash_attention_for_cpu"
    assert count.by_op[attn] > 0


def test_counter_agrees_with_the_trainers_mfu_count_and_train_step_is_3x():
    spec = {"z": (16, 5, 32, 32)}  # dit-standard: 8 x 512, 1280 tokens
    cfg = dit.make_config("dit-standard", spec)
    with fake_mode():
        model = dit.VideoDiT(cfg)
        x = {"z": torch.randn(1, 16, 5, 32, 32)}
        out, fwd = count_flops(lambda: model(x, torch.rand(1)))
        _, bwd = count_flops(lambda: out["z"].sum().backward())
    trunk = dit_trunk_flops(cfg.depth, cfg.hidden, 5 * 16 * 16, cfg.mlp_ratio)
    assert abs(fwd.total / trunk - 1) < 0.01  # the trunk is all but embeddings and heads
    assert 2.9 < (fwd.total + bwd.total) / fwd.total < 3.2


def _train_memory(fake: bool, iterations: int = 2, prime: bool = False):
    torch.manual_seed(0)
    with fake_mode() if fake else contextlib.nullcontext():
        model = dit.VideoDiT(dit.make_config("dit-debug", {"z": (4, 3, 8, 8)}))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        if prime:
            prime_optimizer(opt)

        def loss():
            x = {"z": torch.randn(2, 4, 3, 8, 8)}
            return (model(x, torch.rand(2))["z"] - x["z"]).pow(2).mean()

        return train_step_memory(model, opt, loss, iterations), model.num_parameters()


def test_memory_without_allocating_equals_the_real_run():
    fake, n = _train_memory(True)
    real, _ = _train_memory(False)
    assert fake.peak_bytes == real.peak_bytes and fake.breakdown == real.breakdown
    assert fake.method.startswith("FakeTensorMode + ldm.cost.PeakMemory")
    assert real.method.startswith("ldm.cost.PeakMemory on cpu")
    # fp32 AdamW model state: 4 B weights + 8 B moments (+ 4 B gradients) per parameter, 512 B rounding
    assert 4 * n <= fake.breakdown["params"] < 4 * n + 512 * 60
    assert 8 * n <= fake.breakdown["optimizer"] < 8 * n + 1024 * 60
    assert fake.peak_bytes < adam_model_state_bytes(n) + 10 * fake.breakdown["activations"]
    primed, _ = _train_memory(True, iterations=1, prime=True)
    assert primed.peak_bytes == fake.peak_bytes  # one primed step == the steady state of two
    with pytest.raises(ValueError, match="2 .Adam's state appears"):
        _train_memory(True, iterations=1)


@pytest.mark.parametrize("fake", [False, True])
@pytest.mark.parametrize("adam", [False, True])
def test_peak_of_one_linear_by_hand(fake, adam):
    """y = x W^T, loss = y.sum(), W 128 x 256 fp32 (w = 128 KiB), x 4 x 256 (4 KiB); every scalar
    takes one 512 B block."""
    w = 128 * 256 * 4
    with fake_mode() if fake else contextlib.nullcontext():
        lin = nn.Linear(256, 128, bias=False)
        opt = (torch.optim.Adam(lin.parameters(), lr=0.1, foreach=False) if adam else
               torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, foreach=False))
        prime_optimizer(opt)
        got = train_step_memory(lin, opt, lambda: lin(torch.randn(4, 256)).sum(), iterations=1)
    if adam:
        # the step: W, its gradient, the two moments + the step counter, sqrt(v) and sqrt(v) / c
        # (the denominator), and the loss
        expect = {"params": w, "grads": w, "optimizer": 2 * w + 512 + 2 * w, "activations": 512}
    else:
        # the backward, as it makes W's gradient (not yet accumulated into .grad): W, the momentum,
        # x (saved for the gradient) and the loss, the loss's gradient (1.0) and W's gradient
        expect = {"params": w, "optimizer": w, "activations": 4096 + 512, "temporary": 512 + w}
    assert got.breakdown == {**dict.fromkeys(CATEGORIES, 0), **expect}
    assert got.peak_bytes == sum(expect.values())


def test_memory_is_tracked_with_public_torch_only():
    import inspect

    import ldm.cost

    assert "torch.distributed" not in inspect.getsource(ldm.cost)


class _Loop(nn.Module):
    """A toy diffusion decoder: one network called `steps` times with CFG (batch doubled)."""

    def __init__(self, steps=5):
        super().__init__()
        self.steps = steps
        self.net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))  # weights big enough to be fake

    def forward(self, x):
        for t in torch.linspace(1, 0, self.steps + 1)[:-1]:
            v = self.net(torch.cat([x, x]) * float(t))  # float(t): a real value is read back
            x = x + v[: x.shape[0]]
        return x


def test_repeated_steps_are_counted_without_rerunning():
    with fake_mode(small_real=True):
        model = _Loop(steps=5)
        x = torch.randn(3, 64)
        calls = []
        model.net[0].register_forward_hook(lambda *a: calls.append(1))
        out, memo = count_flops(lambda: model(x), repeats_of=model)
        assert out.shape == (3, 64) and len(calls) == 1  # the network's layers ran once
    assert memo.total == 5 * 2 * (2 * 6 * 64 * 128) == memo.by_op["aten.addmm"]
    with pytest.raises(ValueError, match="fake_mode"):
        count_flops(lambda: model(torch.randn(3, 64)), repeats_of=_Loop())


def test_small_real_mode_keeps_only_small_values_real():
    from torch._subclasses.fake_tensor import FakeTensor

    with fake_mode(small_real=True):
        sched = torch.linspace(1, 0, 11)
        big = torch.randn(512, 512)
        ids = torch.arange(100_000)
        assert not isinstance(sched, FakeTensor) and float(sched[3]) == pytest.approx(0.7)
        assert isinstance(big, FakeTensor) and isinstance(big * sched[0], FakeTensor)
        assert not isinstance(ids, FakeTensor) and int(torch.unique(ids % 7).numel()) == 7
    with fake_mode(), pytest.raises(Exception, match="local_scalar_dense|data-dependent"):
        float(torch.linspace(1, 0, 11)[3])


# ------------------------------------------------------------------------------------------
# ldm cost
# ------------------------------------------------------------------------------------------
def test_cost_cli_json_csv_plot(tmp_path, capsys):
    names = "kl2d-f8c4-debug,causal3d-f4x8c4-debug"
    ldm(["cost", "--autoencoders", names, "--frames", "9", "--height", "64", "--width", "64", "--dit", "dit-debug",
         "--batch-size", "2", "--steps", "10", "--cfg", "--json", "--csv", str(tmp_path / "c.csv"),
         "--plot", str(tmp_path / "c.png")])
    rows = json.loads(capsys.readouterr().out)
    assert [r["autoencoder"] for r in rows] == names.split(",")
    for r in rows:
        assert set(KEYS) <= set(r) and all(r[k] is not None for k in KEYS if k != "vcpr")
        assert r["compression_rate"] == pytest.approx(r["latent_elements"] / (3 * 9 * 64 * 64))
        assert r["compression_factor"] == pytest.approx(1 / r["compression_rate"])
        assert r["dit_forward_flops"] == r["dit_forward_flops_analytic"]
        assert r["sample_flops"] == 10 * 2 * r["dit_forward_flops"] + r["ae_decode_flops"]
        assert "FakeTensorMode + ldm.cost.PeakMemory" in r["method"]
    kl, c3 = rows
    assert kl["latent_shape"] == {"z": [4, 9, 8, 8]} and kl["tokens"] == 9 * 4 * 4 and kl["vcpr"] == 64
    assert c3["latent_shape"] == {"z": [4, 3, 8, 8]} and c3["tokens"] == 3 * 4 * 4 and c3["vcpr"] == 192
    assert c3["dit_forward_flops"] < kl["dit_forward_flops"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "c.csv").read_text().splitlines()) == 3


def test_cost_rows_at_the_nearest_length_or_report_sizes_an_autoencoder_cannot_take(monkeypatch):
    names = ["kl2d-f8c4-debug", "causal3d-f4x8c4-debug", "cmvae-z4-debug"]
    rows = cost_table(names, 16, 64, 64, "dit-debug")
    assert rows[0]["dit_forward_flops"] > 0 and "error" not in rows[0] and "frames_note" not in rows[0]
    # causal3d takes 1 + 4k frames: costed at 17, the nearest (13 is 3 away), and marked
    causal = rows[1]
    assert causal["input"] == [17, 64, 64]
    assert causal["frames_note"].startswith("17f: ") and "1 + 4k" in causal["frames_note"]
    text = format_table(rows)
    assert " @17f " in next(line for line in text.splitlines() if line.startswith("causal3d-f4x8c4-debug"))
    assert text.splitlines()[-1] == f"@{causal['frames_note']}" and "@" not in text.splitlines()[1]
    at17 = cost_table(names[1:], 17, 64, 64, "dit-debug")  # cmvae takes 16 and 20: the shorter on a tie
    assert causal == at17[0] | {"frames_note": causal["frames_note"]} and "frames_note" not in at17[0]
    assert at17[1]["input"] == [16, 64, 64] and at17[1]["frames_note"].startswith("16f: ")
    monkeypatch.setattr(list_models, "NEAREST_FRAMES", 0)  # nothing near: an error row with null costs
    rows = cost_table(names[1:2], 16, 64, 64, "dit-debug")
    assert "1 + 4k frames" in rows[0]["error"] and rows[0]["dit_forward_flops"] is None
    with pytest.raises(KeyError, match="not registered"):
        cost_table(["no-such-ae"], 9, 64, 64, "dit-debug")


def test_variable_rate_decode_is_counted_at_the_base_rate_and_a_missing_cost_says_why():
    """MTC-VAE's decode splits a latent by its stored rates (`example_latent`: all at the base rate,
    the spec's length), not by the keyframe predictor reading random values, so it has a cost at
    any size; a row whose decode cost has no answer says why under the table."""
    from launch.cost import format_table

    rows = cost_table(["kl2d-f8c4-debug", "mtcvae-c4-debug"], 17, 128, 128, "dit-debug")
    assert "ae_decode_error" not in rows[1] and rows[1]["ae_decode_flops"] > 0 and rows[1]["sample_flops"] > 0
    assert rows[0]["ae_encode_flops"] > 0 and "ae_encode_error" not in rows[0] and rows[1]["ae_encode_flops"] > 0
    rows[1] = dict(rows[1], ae_encode_flops=None, ae_encode_error="ValueError: encode's work depends ...")
    assert format_table(rows).splitlines()[-1].startswith("enc GF '-' for mtcvae-c4-debug: ValueError: encode's work")
    rows[0] = dict(rows[0], ae_decode_flops=None, sample_flops=None, ae_decode_error="ValueError: a reason")
    last = format_table(rows).splitlines()[-1]
    assert last == "dec GF / sample TF '-' for kl2d-f8c4-debug: ValueError: a reason"


def test_encode_flops_are_what_extraction_runs_per_clip():
    """``ae_encode_flops``: a per-frame image encoder costs its frames times one frame; Hi-VAE's
    encode equals its own analytic count (base encoder + global and detailed motion encoders)."""
    from autoencoders import build
    from launch.cost import encode_flops

    one = encode_flops("kl2d-f8c4-debug", 1, 64, 64)
    assert one > 0 and encode_flops("kl2d-f8c4-debug", 17, 64, 64) == 17 * one
    # convolutions grow with the pixels, the mid-block attention with their square: a little over 4x
    assert 4 * one < encode_flops("kl2d-f8c4-debug", 1, 128, 128) < 4.2 * one
    model = build("hivae-s-debug")
    assert encode_flops("hivae-s-debug", 8, 32, 32) == model.cost(8, 32, 32)["flops"]["encode"]


def test_mtcvae_encode_flops_equal_a_real_encode():
    """MTC-VAE's encode picks each segment's rate from the pixels (shapes cannot follow it): its
    count is the PSNR selector's work (`encode_work`: every segment encoded and decoded at each
    rate), which equals what a real encode of real clips counts (the chosen rates' posteriors are
    reused; the choice and the keyframe marks add no matmul or convolution)."""
    from autoencoders import build
    from launch.cost import encode_flops
    from ldm.cost import count_flops

    torch.manual_seed(0)
    ae = build("mtcvae-c4-debug").eval()
    video = torch.rand(2, 3, 34, 32, 32) * 2 - 1
    with torch.no_grad():
        _, real = count_flops(lambda: ae.encode(video))
    assert real.total > 0 and encode_flops("mtcvae-c4-debug", 34, 32, 32) * 2 == real.total


def test_cost_table_columns_line_up_with_long_latent_names():
    """Hi-VAE's three-part latent is longer than the latent column was: every row's numbers still
    start under their headings."""
    from launch.cost import format_table

    lines = format_table(cost_table(["kl2d-f8c4-debug", "hivae-s-debug"], 17, 64, 64, "dit-debug")).splitlines()
    assert "global:" in lines[2]
    starts = {line.index(" 0.0") for line in lines[1:]}  # the compression rate column
    assert len(starts) == 1 and lines[0].index("rate") == starts.pop() + 4  # "    rate" over " 0.02083"


def test_cost_reads_a_saved_model_folder(tmp_path):
    import autoencoders

    autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / "ae", name="kl2d-f8c4-debug")
    row, = cost_table([str(tmp_path / "ae")], 9, 64, 64, "dit-debug")
    ref, = cost_table(["kl2d-f8c4-debug"], 9, 64, 64, "dit-debug")
    assert {k: row[k] for k in KEYS if k != "autoencoder"} == {k: ref[k] for k in KEYS if k != "autoencoder"}


def test_a_saved_model_that_cannot_be_built_gets_an_error_row(tmp_path):
    """A folder whose config the model refuses is a row with its error and '-' params, the others
    costed (was: a ValueError traceback from counting its parameters)."""
    import autoencoders

    autoencoders.build("causal3d-f4x8c4-debug").save_pretrained(tmp_path / "ae", name="causal3d-f4x8c4-debug")
    saved = json.loads((tmp_path / "ae" / "config.json").read_text())
    saved["config"]["norm"] = "bad"
    (tmp_path / "ae" / "config.json").write_text(json.dumps(saved))
    bad, ok = cost_table([str(tmp_path / "ae"), "kl2d-f8c4-debug"], 9, 32, 32, "dit-debug")
    assert "norm must be" in bad["error"] and bad["ae_params"] is None and ok["ae_params"] > 0
    assert format_table([bad, ok]).splitlines()[1].split()[1:3] == ["-", "ValueError:"]


def test_cost_and_compare_name_a_train_ae_run_folders_final(tmp_path):
    """A train-ae run folder given for its model: one line naming its final/, as eval recon says it
    (was: "unknown autoencoder ...: nor a saved model folder")."""
    import autoencoders

    autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / "run" / "final", name="kl2d-f8c4-debug")
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"is a `ldm train-ae` run folder; give its final/ folder: .*run/final"):
        ldm(["cost", "--autoencoders", run, "--frames", "9", "--height", "32", "--width", "32"])
    with pytest.raises(UserError, match=r"is a `ldm train-ae` run folder; give its final/ folder"):
        ldm(["compare", "--autoencoders", run, "--synth", "4", "--output", str(tmp_path / "cmp")])


def test_cost_at_65x512x512_allocates_nothing():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.process_time()
    rows = cost_table(["kl2d-f8c4", "causal3d-f4x8c16"], 65, 512, 512, "dit-standard", batch_size=4)
    kl, c3 = rows
    assert kl["tokens"] == 65 * 32 * 32 and c3["tokens"] == 17 * 32 * 32
    assert kl["dit_train_peak_memory_bytes"] > 90 * 2 ** 30  # estimated, far beyond this machine
    assert kl["ae_decode_flops"] > 1e14
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 1_000_000  # KiB: < 1 GiB
    assert time.process_time() - t0 < 30


def test_measure_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        cost_table(["kl2d-f8c4-debug"], 9, 64, 64, "dit-debug", measure=True)
    with pytest.raises(UserError, match="--measure runs the training step on a GPU"):  # before any work, one line
        ldm(["cost", "--autoencoders", "kl2d-f8c4-debug", "--frames", "9", "--height", "32", "--width", "32",
             "--measure"])


def test_cost_table_shows_autoencoder_params_as_ldm_list_and_measured_columns(capsys):
    """The params column is `ldm list`'s count; --measure's memory and step time have columns
    (was: no autoencoder params in `ldm cost`, and the measured numbers only in --json / --csv)."""
    import autoencoders

    rows = cost_table(["causal3d-ivvae-baseline-z8-debug", "kl2d-ivvae-z8-debug"], 9, 32, 32, "dit-debug")
    for r in rows:
        assert r["ae_params"] == autoencoders.describe(r["autoencoder"], 9, 32, 32)["params"]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[1] == "params"
    assert [line.split()[1] for line in lines[1:3]] == [list_models.params_text(r["ae_params"]) for r in rows]
    assert "meas GiB" not in lines[0]
    rows[0].update(dit_train_peak_memory_bytes_measured=3 * 2 ** 29, dit_train_step_seconds_measured=0.125)
    lines = format_table(rows).splitlines()
    assert lines[0].index("meas GiB") + 8 == lines[1].index(" 1.50 ") + 5  # right-aligned under its heading
    assert lines[1].split()[10:12] == ["1.50", "0.125"] and lines[2].split()[10:12] == ["-", "-"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_estimate_against_max_memory_allocated():
    row, = cost_table(["kl2d-f8c4"], 17, 256, 256, "dit-standard", batch_size=2, measure=True)
    ratio = row["dit_train_peak_memory_bytes_measured"] / row["dit_train_peak_memory_bytes"]
    assert 0.85 < ratio < 1.25, ratio


@pytest.mark.slow
def test_cost_all_at_65x512x512(capsys):
    ldm(["cost", "--all", "--frames", "65", "--height", "512", "--width", "512", "--json"])
    rows = json.loads(capsys.readouterr().out)
    import autoencoders

    assert [r["autoencoder"] for r in rows] == sorted(autoencoders.REGISTRY)
    assert any(r.get("dit_forward_flops") for r in rows)


def test_text_guided_decoder_is_costed_with_a_caption():
    import autoencoders

    if "cmvae-z4-text-debug" not in autoencoders.REGISTRY:
        pytest.skip("the cross-modal family is not registered")
    text, plain = cost_table(["cmvae-z4-text-debug", "cmvae-z4-debug"], 8, 64, 64, "dit-debug")
    assert "ae_decode_error" not in text and text["ae_decode_flops"] > plain["ae_decode_flops"]


def test_replayed_diffusion_decoder_count_equals_the_full_run():
    import autoencoders
    from launch.cost import latent_spec

    if "hivae-debug" not in autoencoders.REGISTRY:
        pytest.skip("Hi-VAE is not registered")
    spec = latent_spec("hivae-debug", 9, 64, 64)
    cls, config = autoencoders.REGISTRY["hivae-debug"]
    totals = []
    for memo in (False, True):
        with fake_mode(small_real=True):
            ae = cls(config).eval()
            latent = ae.example_latent(spec, 1)
            with torch.no_grad():
                _, count = count_flops(lambda: ae.decode(latent, Cond()), repeats_of=ae if memo else None)
        totals.append(count.total)
    assert totals[0] == totals[1] > 0


def test_cost_recon_puts_eval_recon_quality_beside_the_cost_at_each_rows_clip(tmp_path, capsys, monkeypatch):
    """``--recon VIDEOS``: a saved autoencoder's row gains PSNR / SSIM equal to ``ldm eval recon``'s
    at the row's clip, decoded by `ldm eval`'s default workers (none on the CPU; on a GPU, was: in process); a
    registered name (random weights) says why it has none; small costs keep three significant digits (was: no
    quality in `ldm cost`, and 0.0 for every debug-sized cost)."""
    import autoencoders
    from data.video import write_video
    from launch.evaluate import evaluate_reconstruction

    torch.manual_seed(0)
    autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / "ae", name="kl2d-f8c4-debug")
    for i in range(3):
        write_video(tmp_path / "videos" / f"{i}.mp4", torch.rand(3, 9, 32, 32) * 2 - 1, fps=8)
    args = ["cost", "--autoencoders", f"{tmp_path / 'ae'},causal3d-f4x8c4-debug", "--frames", "9", "--height", "32",
            "--width", "32", "--dit", "dit-debug", "--recon", str(tmp_path / "videos"), "--recon-clips", "2"]
    ldm(args + ["--json"])
    saved, named = json.loads(capsys.readouterr().out)
    ref = evaluate_reconstruction(autoencoders.load_pretrained(tmp_path / "ae"), str(tmp_path / "videos"), 9, 32, 32,
                                  num=2)
    assert saved["recon_clips"] == 2 and saved["psnr_db"] == ref["psnr_db"]["mean"]
    assert saved["ssim"] == ref["ssim"]["mean"]
    assert "psnr_db" not in named and "random weights" in named["recon_error"]
    lines = format_table([saved, named]).splitlines()
    assert lines[0].split()[-3:] == ["PSNR", "dB", "SSIM"]
    assert lines[1].split()[-2:] == [f"{saved['psnr_db']:.2f}", f"{saved['ssim']:.3g}"]
    assert lines[1].split()[7] == f"{saved['dit_forward_flops'] / 1e9:.3g}" != "0.0"
    assert lines[2].split()[-2:] == ["-", "-"] and lines[3].startswith("PSNR / SSIM '-' for causal3d-f4x8c4-debug")
    with pytest.raises(UserError, match="--recon measures saved autoencoders"):
        ldm(["cost", "--autoencoders", "kl2d-f8c4-debug", "--frames", "9", "--height", "32", "--width", "32",
             "--recon", str(tmp_path / "videos")])
    import launch.extract  # a GPU's default: decoding workers, the same result
    loaders, real = [], torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader",
                        lambda *a, **k: loaders.append(k["num_workers"]) or real(*a, **k))
    monkeypatch.setattr(launch.extract, "auto_workers", lambda requested, device, ranks: 2)
    ldm(args + ["--json"])
    assert json.loads(capsys.readouterr().out)[0] == saved and loaders == [2]


def test_meta_models_are_built_once_per_config():
    """`ldm list` and `ldm cost` ask for each model's shapes at several clip lengths: the meta-device
    model is built once per (class, config) and shared (was: built at every length, ~0.1 s each)."""
    import autoencoders

    cls, config = autoencoders.REGISTRY["ivvae-z8-debug"]
    model = autoencoders.meta_model(cls, config)
    assert autoencoders.meta_model(*autoencoders.config_of("ivvae-z8-debug")) is model
    assert next(model.parameters()).is_meta
    other = autoencoders.meta_model(cls, dataclasses.replace(config, temporal_padding="causal"))
    assert other is not model and other.config.temporal_padding == "causal"

"""MTC-VAE: per-rate shapes, conversion from causal3d, the compression algorithm (Eq. 1-3) and its
three selectors, keyframe embedding + predictor + split decoding (with the fallback), the two-step
fine-tuning terms, the flow-guided loss, save/load, and the paper-size configs' specs."""

import copy

import pytest
import torch

import autoencoders
from autoencoders.losses import AELoss, AELossConfig
from autoencoders.mtcvae import MTCVAE, convert
from autoencoders.mtcvae_layers import (Segment, compression_tolerance, flow_guided_loss, keyframe_accuracy,
                                        optical_flow, segments_from_rates, select_rates, split_segments, warp)
from data.synth import render_clip
from launch.cli import main as ldm

RATES = (4, 8, 16)


def _smooth_clips(n, frames, size, seed):
    """Smooth random videos in [-1, 1] (cheap stand-ins with texture and motion)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, frames // 6), 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(frames, size, size), mode="trilinear") * 2 - 1


def _synth(i, speed, size=32, frames=17):
    attrs = dict(shape="square", color="red", direction="right", speed=speed, background="noise")
    clip = torch.from_numpy(render_clip(attrs, frames, size, size, i)).float()
    return clip.permute(3, 0, 1, 2) / 127.5 - 1  # (C, T, H, W)


def _static_then_fast(size=32):
    fast = _synth(1, "fast", size)
    static = _synth(2, "slow", size)[:, :1].expand(-1, 17, -1, -1)
    return torch.cat([static, fast], 1)[None]  # (1, C, 34, H, W)


@pytest.fixture(scope="module")
def ae():
    torch.manual_seed(0)
    return autoencoders.build("mtcvae-c4-debug").eval()


# ---------------------------------------------------------------------------------------------
# shapes, conversion, specs
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_each_rate_shapes_and_frames(ae):
    x = _smooth_clips(2, 34, 16, 0)
    for rate in RATES:
        mean, logvar = ae.encode_segments(x[:, :, :17], rate)
        assert mean.shape == logvar.shape == (2, 4, 1 + 16 // rate, 2, 2)
        assert ae.decode_segments(mean, rate).shape == (2, 3, 17, 16, 16)
        lat = ae.encode_at(x, torch.full((2, 2), rate))
        assert lat.form == "varlen" and lat["z"].shape == (2, 4, 2 * (1 + 16 // rate), 2, 2)
        assert ae.decode(lat).shape == x.shape
    lat = ae.encode_at(x, torch.tensor([[4, 16], [8, 8]]))
    assert lat.aux["length"].tolist() == [7, 6] and lat["z"].shape[2] == 7
    assert lat.aux["keyframe"].tolist() == [[1, 0, 0, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0, 0]]
    assert lat.aux["rates"].tolist() == [[4, 16], [8, 8]]
    assert lat["z"][1, :, 6:].abs().max() == 0  # padding stays zero
    assert [tuple(v.shape) for v in ae.decode_videos(lat)] == [(3, 34, 16, 16)] * 2
    with pytest.raises(ValueError, match="multiple of 17"):
        ae.encode(torch.zeros(1, 3, 20, 16, 16))
    with pytest.raises(ValueError, match="not among"):
        ae.encode_at(x, torch.tensor([[4, 2], [4, 4]]))


@torch.no_grad()
def test_convert_from_causal3d_keeps_the_4x_path():
    torch.manual_seed(0)
    base = autoencoders.build("causal3d-f4x8c4-debug").eval()
    mtc = convert(base).eval()
    assert mtc.config.stage == 1
    x = _smooth_clips(1, 17, 16, 1)
    mean, _ = mtc.encode_segments(x, 4)
    torch.testing.assert_close(mean, base.encode(x)["z"])
    torch.testing.assert_close(mtc.decode_segments(mean, 4), base.decode(base.encode(x)))
    host = mtc.encoder.temporal_down[mtc.host].conv.weight
    for layer in mtc.extra_down:
        torch.testing.assert_close(layer.conv.weight, host)  # initialised from the base's sampler
    for layer in mtc.extra_up:
        torch.testing.assert_close(layer.conv.weight, mtc.decoder.temporal_up[mtc.host].conv.weight)
    trainable = {n.split(".")[0] for n, p in mtc.named_parameters() if p.requires_grad}
    assert trainable == {"extra_down", "extra_up"}  # stage 1: the new sampling layers
    # f_c starts at zero and the decoder reads z + f_c: the whole 4x path (marks included) is the base
    torch.testing.assert_close(mtc.decode(mtc.encode_at(x, torch.tensor([[4]]))), base.decode(base.encode(x)))
    stage2 = convert(mtc, stage=2)
    trainable = {n.split(".")[0] for n, p in stage2.named_parameters() if p.requires_grad}
    assert trainable == {"keyframe_embed", "predictor"}  # Sec. 3.5: f_c + P, the decoder frozen
    old = convert(mtc, stage=2, stage2_mode="decoder")  # the documented older mode
    trainable = {n.split(".")[0] for n, p in old.named_parameters() if p.requires_grad}
    assert trainable == {"keyframe_embed", "predictor", "decoder", "extra_up"}
    with pytest.raises(TypeError):
        convert(autoencoders.build("kl2d-f8c4-debug"))


def test_convert_saved_causal3d_to_a_registered_name_is_stage_1(tmp_path, capsys):
    """``ldm convert --source saved`` of a trained causal3d into ``mtcvae-c4-debug`` starts stage 1
    on it, as ``--base-checkpoint`` does (was: the registered name's stage 0, so ``--init DIR``
    trained everything at random rates)."""
    autoencoders.build("causal3d-f4x8c4-debug").save_pretrained(tmp_path / "base")
    assert ldm(["convert", "--source", "saved", "--path", str(tmp_path / "base"), "--target", "mtcvae-c4-debug",
                "--output", str(tmp_path / "mtc")]) == 0
    mtc = autoencoders.load_pretrained(tmp_path / "mtc")
    assert mtc.config.stage == 1
    assert {n.split(".")[0] for n, p in mtc.named_parameters() if p.requires_grad} == {"extra_down", "extra_up"}


@torch.no_grad()
def test_load_base_then_stages_is_the_cli_protocol(tmp_path):
    """``--base-checkpoint`` (``load_base``) on the registered name gives what ``convert`` of the
    causal3d gives; ``with_stage`` moves between stages; a base of another architecture is refused."""
    torch.manual_seed(0)
    base = autoencoders.build("causal3d-f4x8c4-debug", latent_scale=(0.5,), latent_shift=(0.1,)).eval()
    base.save_pretrained(tmp_path / "base")
    autoencoders.build("causal3d-f4x8c16-debug").save_pretrained(tmp_path / "wide")
    assert (MTCVAE.base_family, MTCVAE.stages, MTCVAE.variable_rate) == ("causal3d", (0, 1, 2), True)
    mtc = autoencoders.build("mtcvae-c4-debug")
    mtc.load_base(tmp_path / "base")
    mtc = mtc.with_stage(1).eval()
    ref = convert(base).eval()
    assert mtc.config.stage == 1 and (mtc.config.latent_scale, mtc.config.latent_shift) == ((0.5,), (0.1,))
    for (n, p), q in zip(mtc.state_dict().items(), ref.state_dict().values()):
        if not n.startswith(("keyframe_embed", "predictor")):  # new parts: random either way
            torch.testing.assert_close(p, q, msg=n)
    trainable = {n.split(".")[0] for n, p in mtc.named_parameters() if p.requires_grad}
    assert trainable == {"extra_down", "extra_up"} and mtc.stage == 1
    assert mtc.with_stage(1) is mtc and mtc.with_stage(2).stage == 2
    with pytest.raises(ValueError, match="does not match"):
        autoencoders.build("mtcvae-c4-debug").load_base(tmp_path / "wide")
    with pytest.raises(ValueError, match="must be a causal3d"):
        autoencoders.build("kl2d-f8c4-debug").save_pretrained(tmp_path / "kl")
        autoencoders.build("mtcvae-c4-debug").load_base(tmp_path / "kl")


def test_latent_spec_vcpr_and_paper_configs():
    for name, c in (("mtcvae-c4", 4), ("mtcvae-c16", 16)):
        info = autoencoders.describe(name, frames=34, height=256, width=256)  # meta device: no weights
        assert info["latent_shape"] == {"z": [c, 10, 32, 32]} and info["form"] == "varlen"
        assert info["vcpr_per_rate"] == {"4": 256.0, "8": 512.0, "16": 1024.0}
        assert info["vcpr"] == 256.0
        with torch.device("meta"):
            model = autoencoders.build(name)
        spec = model.latent_spec(34, 256, 256, {4: 1, 8: 1, 16: 1})
        assert spec.vcpr == pytest.approx(1792 / 3)  # mean of the per-segment VCPRs (Tab. 5: random ~598)
        assert spec.mix_latent_frames == pytest.approx(2 * (5 + 3 + 2) / 3)
        assert model.latent_spec(34, 256, 256, {4: 0.5, 16: 0.5}).vcpr == 640.0
        extra = sum(p.numel() for m in (model.extra_down, model.extra_up, model.predictor) for p in m.parameters())
        assert model.num_parameters() > extra > 0
    ae = autoencoders.build("mtcvae-c4-debug")
    with pytest.raises(ValueError, match="rate_mix"):
        ae.latent_spec(17, 32, 32, {2: 1.0})
    assert ae.varlen_length(34, 4) == 10 and ae.varlen_length(34, 16) == 4 and ae.varlen_length(34, 8) == 6
    with pytest.raises(ValueError, match="outside"):
        ae.varlen_length(34, 32)
    with pytest.raises(ValueError, match="rates must start"):
        autoencoders.build("mtcvae-c4-debug", rates=(2, 4, 8))
    with pytest.raises(ValueError, match="segment_frames"):
        autoencoders.build("mtcvae-c4-debug", segment_frames=9)
    with pytest.raises(ValueError, match="stage 1"):
        autoencoders.build("mtcvae-c4-debug", stage=1, train_rates="selector")
    with pytest.raises(ValueError, match="stage2_mode"):
        autoencoders.build("mtcvae-c4-debug", stage2_mode="decoder_too")


# ---------------------------------------------------------------------------------------------
# compression algorithm
# ---------------------------------------------------------------------------------------------
def test_eq1_to_3_on_quality_vectors():
    q = torch.tensor([[35.0, 34.8, 34.5],   # static: high and flat
                      [28.0, 24.0, 20.0]])  # fast: steep
    alpha = compression_tolerance(q)
    qbar, sd = q.mean(1), q.std(1, unbiased=False)
    expect = 0.5 * (qbar - 20) / 15 + 0.5 * (1 - sd / sd.max())
    torch.testing.assert_close(alpha, expect.double())
    assert select_rates(q, RATES).tolist() == [16, 4]
    # w controls the trade-off (Tab. 3): a large w compresses even the fast segment
    assert select_rates(q, RATES, weight=50.0).tolist() == [16, 16]
    assert select_rates(q, RATES, weight=0.0).tolist() == [4, 4]
    # a dataset reference instead of the clip's own range, clipped to [0, 1]
    assert compression_tolerance(q, (0.0, 100.0, 1.0)).min() >= 0
    flat = torch.full((2, 3), 30.0)  # degenerate: everything equal -> most tolerant
    assert select_rates(flat, RATES).tolist() == [16, 16]


def test_h264_selector_static_vs_fast():
    ae = autoencoders.build("mtcvae-c4-debug", selector="h264")
    video = torch.cat([_static_then_fast(), torch.flip(_static_then_fast(), dims=[2])])  # static first / last
    rates = ae.choose_rates(video)
    assert rates[0, 0] > rates[0, 1] and rates[1, 1] > rates[1, 0]
    assert rates.tolist() == [[16, 4], [4, 16]]


def test_random_selector_is_seeded():
    a = autoencoders.build("mtcvae-c4-debug", selector="random", selector_seed=3)
    b = autoencoders.build("mtcvae-c4-debug", selector="random", selector_seed=3)
    video = torch.zeros(4, 3, 51, 16, 16)
    ra, rb = a.choose_rates(video), b.choose_rates(video)
    assert ra.shape == (4, 3) and torch.equal(ra, rb) and set(ra.flatten().tolist()) <= set(RATES)


def test_psnr_selector_follows_reconstruction_quality(monkeypatch):
    """The PSNR selector with a stand-in codec whose rate-c reconstruction holds every c-th frame
    (so quality falls with motion as a real VAE's does): static -> 16x, fast -> 4x."""
    ae = autoencoders.build("mtcvae-c4-debug")  # selector="psnr" is the default

    def encode(seg, rate):  # the latent has the model's 4 channels (f_c is added to it): RGB + a zero one
        z = torch.cat([seg[:, :, ::rate], torch.zeros_like(seg[:, :1, ::rate])], 1)
        return z, torch.zeros_like(z)

    def decode(z, rate):
        return torch.cat([z[:, :3, :1], z[:, :3, 1:].repeat_interleave(rate, 2)], 2)

    monkeypatch.setattr(ae, "encode_segments", encode)
    monkeypatch.setattr(ae, "decode_segments", decode)
    q = ae.quality_vectors(_static_then_fast().unflatten(2, (2, 17)).transpose(1, 2).flatten(0, 1))
    assert q[0].tolist() == [60.0, 60.0, 60.0] and q[1, 0] > q[1, 1] > q[1, 2]  # static capped, fast falls
    assert ae.choose_rates(_static_then_fast()).tolist() == [[16, 4]]


def test_encode_takes_the_psnr_selectors_posteriors_instead_of_encoding_again(monkeypatch):
    """Inference: the PSNR selector has encoded every segment at every rate; `encode` takes the chosen
    rates' posteriors from there (R encoder passes, was R + one per chosen rate) with the latent of
    encoding again at the chosen rates. With gradients on it encodes again (the selector's have none)."""
    ae = autoencoders.build("mtcvae-c4-debug").eval()
    video = _static_then_fast()
    calls = []
    real = ae.encode_segments
    monkeypatch.setattr(ae, "encode_segments", lambda seg, rate: calls.append(rate) or real(seg, rate))
    with torch.no_grad():
        taken = ae.encode(video)
        assert calls == list(RATES)
        again = ae.encode_at(video, taken.aux["rates"])
    torch.testing.assert_close(taken["z"], again["z"], rtol=0, atol=1e-6)
    torch.testing.assert_close(taken.logvar["z"], again.logvar["z"], rtol=0, atol=1e-6)
    assert torch.equal(taken.aux["keyframe"], again.aux["keyframe"])
    calls.clear()
    with_grad = ae.encode(video)
    assert len(calls) == len(RATES) + len(set(with_grad.aux["rates"].flatten().tolist()))
    assert with_grad["z"].requires_grad


# ---------------------------------------------------------------------------------------------
# keyframe predictor and split decoding
# ---------------------------------------------------------------------------------------------
def test_split_segments_and_fallback():
    T = 17
    probs = torch.tensor([0.9, 0.05, 0.1, 0.02, 0.0, 0.97, 0.1, 0.92, 0.05, 0.03])  # 5 (4x) + 2 (16x) + 3 (8x)
    segs = split_segments(probs, T, RATES)
    assert [(s.start, s.length, s.rate, s.fallback) for s in segs] == [(0, 5, 4, False), (5, 2, 16, False),
                                                                       (7, 3, 8, False)]
    assert sum(s.frames for s in segs) == 3 * 17
    # low confidence inside the first segment -> base rate 4 (the paper's 256x) and its length
    unsure = probs.clone()
    unsure[2] = 0.45
    segs = split_segments(unsure, T, RATES)
    assert (segs[0].rate, segs[0].length, segs[0].fallback) == (4, 5, True)
    # low confidence later -> the previous segment's rate
    unsure = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0])  # 16x (2), then unsure up to frame 5
    segs = split_segments(unsure, T, RATES)
    assert [(s.rate, s.length, s.fallback) for s in segs] == [(16, 2, False), (16, 2, True), (16, 2, True),
                                                              (16, 2, False)]
    # a length no rate produces (4 frames) also falls back; the tail is cut at the latent's end
    segs = split_segments(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]), T, RATES)
    assert [(s.start, s.length, s.rate) for s in segs] == [(0, 5, 4), (5, 2, 16)]
    assert segs[0].fallback and not segs[1].fallback
    assert segments_from_rates([8, 4, 0], T) == [Segment(0, 3, 8), Segment(3, 5, 4)]


def test_keyframe_split_round_trip_on_mixed_rates(capsys):
    """Stage 2 in miniature: train f_c + P with BCE on mixed-rate latents, then split unseen
    latents without their rates: every keyframe and rate is recovered and decoding gives every
    frame back (the paper reports 99.8 % keyframe accuracy)."""
    torch.manual_seed(0)
    ae = autoencoders.build("mtcvae-c4-debug", stage=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        train = ae._encode_at(_smooth_clips(8, 51, 16, 2), torch.tensor(RATES)[torch.randint(3, (8, 3), generator=g)],
                              mark=False)
        test_rates = torch.tensor(RATES)[torch.randint(3, (8, 3), generator=g)]
        test = ae._encode_at(_smooth_clips(8, 51, 16, 3), test_rates, mark=False)
    opt = torch.optim.Adam([p for p in ae.parameters() if p.requires_grad], lr=1e-2)
    first = None
    # posterior means: a random-weight encoder has logvar ~ 0, so its samples are mostly noise
    for step in range(120):
        loss = ae.keyframe_bce(ae.mark_keyframes(train))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    with torch.no_grad():
        marked = ae.mark_keyframes(test)
        generated = marked.replace(aux={"length": marked.aux["length"]})  # what a DiT emits: no rates
        probs = torch.sigmoid(ae.predictor(marked["z"], marked.aux["length"]))
        accs = [keyframe_accuracy(p[:n], k[:n]) for p, k, n in
                zip(probs, marked.aux["keyframe"], marked.aux["length"].tolist())]
        segments = ae._segments(generated)
        videos = ae._decode_videos(generated)
    accuracy = sum(accs) / len(accs)
    with capsys.disabled():
        print(f"\nkeyframe accuracy on unseen mixed-rate latents: {100 * accuracy:.1f} %")
    assert accuracy >= 0.99
    assert [[s.rate for s in segs] for segs in segments] == test_rates.tolist()
    assert not any(s.fallback for segs in segments for s in segs)
    assert all(v.shape == (3, 51, 16, 16) for v in videos)


@torch.no_grad()
def test_rate_report_gives_the_papers_vcpr_and_keyframe_accuracy(ae):
    """Tab. 1's VCPR (per segment c x 8 x 8: 256 / 512 / 1024, averaged over the segments) and Sec.
    4.1's Acc. of P (frame 0 always a keyframe), per sample of an encoded latent."""
    model = copy.deepcopy(ae)
    latent = model.encode_at(_smooth_clips(2, 34, 16, 0), torch.tensor([[4, 16], [8, 8]]))
    model.predictor.proj.weight.zero_()
    model.predictor.proj.bias.fill_(100.0)  # P calls every frame a keyframe
    report = model.rate_report(latent)
    assert [r["rates"] for r in report] == [[4, 16], [8, 8]]
    assert [r["vcpr"] for r in report] == [640.0, 512.0]
    assert [r["keyframe_accuracy"] for r in report] == pytest.approx([2 / 7, 2 / 6])  # 5 + 2 and 3 + 3 frames
    model.predictor.proj.bias.fill_(-100.0)  # no keyframe called: only frame 0 (by definition) is right
    assert [r["keyframe_accuracy"] for r in model.rate_report(latent)] == pytest.approx([6 / 7, 5 / 6])
    generated = latent.replace(aux={"length": latent.aux["length"]})  # a DiT's latent: no true keyframes
    assert "keyframe_accuracy" not in model.rate_report(generated)[0]


# ---------------------------------------------------------------------------------------------
# flow-guided loss
# ---------------------------------------------------------------------------------------------
def test_optical_flow_and_flow_guided_loss():
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def texture(dx):
        return (0.6 * torch.sin((xs - dx) / 2.5) * torch.cos(ys / 3.1) + 0.3 * torch.sin((xs - dx + ys) / 4.0))

    a, b = texture(0.0).expand(1, 3, 32, 32), texture(2.0).expand(1, 3, 32, 32)
    flow = optical_flow(a, b)
    assert flow[:, 0, 8:24, 8:24].mean().item() == pytest.approx(2.0, abs=0.15)  # b(x + f) = a(x)
    assert flow[:, 1, 8:24, 8:24].abs().mean().item() < 0.15
    assert (warp(b, flow) - a).abs().mean() < 0.25 * (b - a).abs().mean()
    video = torch.stack([texture(float(t)) for t in range(5)])[None, None].expand(1, 3, 5, 32, 32)
    shifted = torch.stack([texture(t + 1.0) for t in range(5)])[None, None].expand(1, 3, 5, 32, 32)
    quality, motion = flow_guided_loss(video, video)
    assert quality.item() < 1e-6 and motion.item() < 1e-6
    recon = shifted.clone().requires_grad_(True)
    quality, motion = flow_guided_loss(recon, video)
    assert motion.item() > 0.5 and quality.item() < (shifted - video).abs().mean().item()
    (quality + motion).backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0  # both terms reach the reconstruction


# ---------------------------------------------------------------------------------------------
# training, save/load
# ---------------------------------------------------------------------------------------------
def _step(ae, loss_fn, opt, video, step):
    out = ae.train_forward(video, None, torch.Generator().manual_seed(step))
    total, logs = loss_fn.generator_loss(video, out, step)
    opt.zero_grad()
    total.backward()
    opt.step()
    return total.item(), logs, out


def test_training_steps_lower_the_loss_and_respect_stages():
    torch.manual_seed(0)
    ae = autoencoders.build("mtcvae-c4-debug", stage=0)
    video = _smooth_clips(1, 17, 16, 4)
    loss_fn = AELoss(AELossConfig())
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    losses = []
    for step in range(8):
        loss, logs, out = _step(ae, loss_fn, opt, video, step)
        losses.append(loss)
    assert {"rec", "kl", "bce", "flow", "loss"} <= set(logs) and out.recon.shape == video.shape
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses

    stage1 = convert(ae, stage=1)
    out = stage1.train_forward(_smooth_clips(1, 34, 16, 5), None, torch.Generator().manual_seed(0))
    assert set(out.losses) == set()  # stage 1: the trainer's rec + KL (+ GAN) only
    assert set(out.posterior.aux["rates"].flatten().tolist()) <= {8, 16}  # the new layers' rates (Sec. 3.5)
    (out.recon.mean() + out.posterior["z"].mean()).backward()
    grads = {n.split(".")[0] for n, p in stage1.named_parameters() if p.grad is not None}
    assert grads <= {"extra_down", "extra_up"}
    assert stage1.last_layer() is stage1.extra_up[0].conv.weight  # the GAN's adaptive weight target

    stage2 = convert(ae, stage=2)
    clip = _smooth_clips(1, 34, 16, 6)
    out = stage2.train_forward(clip, None, torch.Generator().manual_seed(0))
    assert set(out.losses) == {"bce", "flow"}
    assert stage2.training_rates() == "selector"  # Alg. 1: the compression algorithm's rates
    assert torch.equal(out.posterior.aux["rates"], stage2.choose_rates(clip))
    sum(out.losses.values()).add(out.recon.mean()).backward()
    grads = {n.split(".")[0] for n, p in stage2.named_parameters() if p.grad is not None}
    assert grads == {"keyframe_embed", "predictor"}  # Sec. 3.5: the decoder is frozen
    assert stage2.last_layer() is stage2.keyframe_embed

    old = convert(ae, stage=2, stage2_mode="decoder")  # the older mode: decoder trained, random rates
    out = old.train_forward(clip, None, torch.Generator().manual_seed(0))
    assert old.training_rates() == "random"
    sum(out.losses.values()).add(out.recon.mean()).backward()
    grads = {n.split(".")[0] for n, p in old.named_parameters() if p.grad is not None}
    assert grads == {"keyframe_embed", "predictor", "decoder", "extra_up"}


def test_stage2_flow_loss_reaches_the_keyframe_embedding(capsys):
    """Sec. 3.5: stage 2 trains f_c with the flow-guided loss, so f_c must be in what the decoder
    reads. The flow loss alone gives f_c a non-zero gradient; with f_c taken off before decoding
    (``stage2_mode="decoder"``) the gradient is exactly zero."""
    torch.manual_seed(0)
    base = autoencoders.build("mtcvae-c4-debug", stage=2)
    clip = _smooth_clips(2, 34, 16, 8)
    norms = {}
    for mode in ("paper", "decoder"):
        model = convert(base, stage2_mode=mode, bce_weight=0.0)
        out = model.train_forward(clip, None, torch.Generator().manual_seed(0))
        assert set(out.losses) == {"flow"}
        (grad,) = torch.autograd.grad(out.losses["flow"], [model.keyframe_embed], allow_unused=True)
        norms[mode] = 0.0 if grad is None else grad.norm().item()
    with capsys.disabled():
        print(f"\n|d flow / d f_c|: paper {norms['paper']:.3e}, decoder mode {norms['decoder']:.3e}")
    assert norms["paper"] > 1e-8 and norms["decoder"] == 0.0


def test_decoder_reads_the_marked_latent_in_training_and_at_inference():
    """What the decoder reads (Eq. 5, Alg. 1-2): ``decode`` of an encoded latent decodes each
    segment with f_c on its first frame, and ``train_forward``'s reconstruction is ``decode`` of
    its marked posterior sample; the older mode takes f_c off first in both."""
    torch.manual_seed(0)
    x = _smooth_clips(1, 34, 16, 9)
    rates = torch.tensor([[4, 16]])
    for mode in ("paper", "decoder"):
        model = autoencoders.build("mtcvae-c4-debug", stage=2, stage2_mode=mode, train_rates="selector",
                                   latent_scale=(0.5,), latent_shift=(0.1,)).eval()
        with torch.no_grad():
            model.keyframe_embed.normal_()  # a trained, non-zero f_c
            latent = model.encode_at(x, rates)
            mean = [model.encode_segments(x[:, :, 17 * i:17 * (i + 1)], int(c))[0] for i, c in enumerate(rates[0])]
            if mode == "paper":
                mean = [torch.cat([m[:, :, :1] + model._embed(int(c), m), m[:, :, 1:]], 2)
                        for m, c in zip(mean, rates[0])]
            expect = torch.cat([model.decode_segments(m, int(c)) for m, c in zip(mean, rates[0])], 2)
            torch.testing.assert_close(model.decode(latent), expect)
        out = model.train_forward(x, None, torch.Generator().manual_seed(3))
        with torch.no_grad():
            marked = model.mark_keyframes(out.posterior.sample(torch.Generator().manual_seed(3)))
            torch.testing.assert_close(model.decode(model._scale(marked, forward=True)), out.recon,
                                       atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_and_stage2_ema(tmp_path):
    torch.manual_seed(0)
    ae = autoencoders.build("mtcvae-c4-debug", latent_scale=(0.5,), latent_shift=(0.1,)).eval()
    x = _smooth_clips(1, 34, 16, 7)
    ae.save_pretrained(tmp_path / "a", name="mtcvae-c4-debug")
    loaded = autoencoders.load_pretrained(tmp_path / "a").eval()
    assert isinstance(loaded, MTCVAE)
    with torch.no_grad():
        rates = torch.tensor([[8, 16]])
        la, lb = ae.encode_at(x, rates), loaded.encode_at(x, rates)
        torch.testing.assert_close(la["z"], lb["z"])
        torch.testing.assert_close(ae.decode(la), loaded.decode(lb))

    stage2 = convert(ae, stage=2, ema_decay=0.5)
    loss_fn = AELoss(AELossConfig())
    opt = torch.optim.Adam([p for p in stage2.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        _step(stage2, loss_fn, opt, x, step)
    live = stage2.predictor.proj.weight.detach().clone()
    ema = stage2.ema__predictor__proj__weight.clone()
    assert int(stage2.ema_steps) == 3 and not torch.equal(live, ema)
    stage2.save_pretrained(tmp_path / "b")
    torch.testing.assert_close(stage2.predictor.proj.weight, live)  # live weights kept in memory
    saved = autoencoders.load_pretrained(tmp_path / "b")
    torch.testing.assert_close(saved.predictor.proj.weight, ema)  # the EMA weights were written

    # a folder saved before stage2_mode existed was trained with f_c taken off before decoding
    import json
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    del saved["config"]["stage2_mode"]
    saved["config"].update(stage2_decoder=True, train_rates="random")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    (tmp_path / "old" / "model.safetensors").write_bytes((tmp_path / "a" / "model.safetensors").read_bytes())
    assert autoencoders.load_pretrained(tmp_path / "old").config.stage2_mode == "decoder"

    autoencoders.load_pretrained(tmp_path / "a").with_stage(2).save_pretrained(tmp_path / "c", name="mine")
    c = autoencoders.load_pretrained(tmp_path / "c")
    assert c.config.stage == 2 and int(c.ema_steps) == 0


@pytest.mark.slow
def test_two_step_recipe_through_the_ae_trainer(tmp_path):
    """Sec. 3.5 with `ldm train-ae`, the staged protocol Hi-VAE uses too: a trained causal3d as
    ``--base-checkpoint`` -> ``--stage 1`` (new sampling layers, rec + KL + GAN) -> ``--init
    S1/final --stage 2`` (f_c + P at the selector's rates, BCE + flow, EMA written at the end)."""
    import json

    from data.synth import synth_dataset
    from launch.train_ae import TrainAEConfig, train_autoencoder

    synth_dataset(tmp_path / "videos", num=2, frames=34, size=32, fps=8, seed=0)
    torch.manual_seed(0)
    autoencoders.build("causal3d-f4x8c4-debug").save_pretrained(tmp_path / "base", name="causal3d-f4x8c4-debug")
    common = dict(data=str(tmp_path / "videos"), frames=34, height=32, width=32, batch_size=1, log_every=1,
                  num_workers=0, latent_stats_clips=1, progress=False)
    s1 = train_autoencoder(TrainAEConfig(output=str(tmp_path / "s1"), autoencoder="mtcvae-c4-debug",
                                         base_checkpoint=str(tmp_path / "base"), stage=1, steps=2, save_every=2,
                                         sample_every=2, gan=True, **common))
    assert s1["stage"] == 1
    train_autoencoder(TrainAEConfig(output=str(tmp_path / "s2"), init=str(tmp_path / "s1" / "final"), stage=2,
                                    steps=3, save_every=3, sample_every=3, **common))
    logs = [json.loads(line) for line in (tmp_path / "s2" / "log.jsonl").read_text().splitlines()]
    assert {"bce", "flow", "rec", "kl"} <= set(logs[-1])
    final = autoencoders.load_pretrained(tmp_path / "s2" / "final")
    assert isinstance(final, MTCVAE) and final.config.stage == 2 and int(final.ema_steps) == 3

"""Device correctness without a GPU: every registered autoencoder, a DiT training step, an
autoencoder training step (`ldm train-ae`), the samplers and ``ldm sample``'s sampling + decode
path run with tensors on a stand-in device (``tests/offdevice.py``: real values, CUDA's rule
against mixing devices), so a tensor created on the CPU inside a forward fails here as it would on
CUDA (the MTC-VAE bug of the GPU report did).
The same runs count host syncs (a value read on the host, a data-dependent shape): none in the
model code except where the method itself decides on the host (`HOST_READS`, packed varlen rows)."""
import contextlib
import dataclasses

import pytest
import torch

import autoencoders
import dit
from ldm import samplers
from ldm.latent import Cond, Latent
from aes import example_batch, registered, text_cond
from offdevice import OFF, OffDevice, OffDeviceTensor, off


# families whose method reads values on the host (a GPU waits there); every other family's encode
# and decode never does (a host sync drains the GPU's queue: extraction and sampling stall on it)
HOST_READS = {"mtcvae": "encode picks each segment's temporal rate from the content (Alg. 1, on the host) and "
                        "decode sizes each segment's frames by its rate"}


def _roundtrip(name: str) -> None:
    torch.manual_seed(0)
    ae = autoencoders.build(name).eval()
    video, cond = example_batch(ae)
    with torch.no_grad():
        ref = ae.decode(ae.encode(video, cond), cond) if not name.startswith("hivae") else None
        with OffDevice() as dev:
            ae_off, cond_off = off(ae), None if cond is None else Cond(*off([cond.text, cond.text_mask, None, None]))
            video_off = off(video)
            dev.syncs.clear()
            latent = ae_off.encode(video_off, cond_off)
            assert all(v.device == OFF for v in latent.parts.values())
            out = ae_off.decode(latent, cond_off)
            assert out.device == OFF and out.shape[:2] == (2, 3)
            syncs = dict(dev.syncs)
            back = out.cpu()
    assert type(back) is torch.Tensor and torch.isfinite(back).all()
    family = name.split("-")[0]
    if family in HOST_READS:
        assert syncs, f"{name} no longer reads values on the host: drop it from HOST_READS"
    else:  # on a GPU, encode and decode queue their work without waiting for it
        assert not syncs, f"{name} waits for the device: {syncs}"
    if ref is not None:  # the stand-in runs the very same numbers
        torch.testing.assert_close(back, ref, atol=1e-5, rtol=1e-5)


def test_the_stand_in_device_flags_mixing_like_cuda():
    with OffDevice():
        x = torch.randn(3, 4, device=OFF)
        assert isinstance(x, OffDeviceTensor) and x.device == OFF
        y = x * 2 + torch.arange(4, device=x.device) + torch.tensor(1.0)  # 0-d CPU tensors may mix
        assert float(y.sum()) == pytest.approx(float((x.cpu() * 2 + torch.arange(4) + 1).sum()))
        assert x[torch.tensor([0, 2])].shape == (2, 4)  # CPU indices may index
        with pytest.raises(RuntimeError, match="same device"):
            x * torch.ones(3, 4)
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([x, torch.zeros(1, 4)])
        lin = torch.nn.Linear(4, 2).to(OFF)
        lin(x).sum().backward()
        assert lin.weight.grad.device == OFF
        assert torch.nonzero(x > 0).device == OFF and (x > 0).sum().item() >= 0


def test_the_stand_in_device_counts_host_syncs():
    with OffDevice() as dev:
        x = torch.randn(6, device=OFF)
        dev.syncs.clear()
        y = torch.where(x > 0, x * 2, x.new_zeros(())).reshape(2, 3).sum(0)  # queued work only
        assert not dev.syncs
        float(y.sum())
        x[x > 0]
        torch.nonzero(x)
        x.cpu()
        x.tolist()
        torch.repeat_interleave(x.new_ones(2, dtype=torch.long))
        assert dev.syncs == {"_local_scalar_dense": 1, "boolean index": 1, "nonzero": 1, "copy to host": 1,
                             "tolist": 1, "repeat_interleave": 1}
    with OffDevice() as outer:  # nested modes: each counts what runs inside it
        with OffDevice() as inner:
            pass
        with OffDevice() as inner:
            float(y.sum())
        float(y.sum())
    assert inner.syncs == {"_local_scalar_dense": 1} and outer.syncs == {"_local_scalar_dense": 2}


@pytest.mark.parametrize("name", registered(debug=True))
def test_autoencoder_runs_off_the_cpu(name):
    _roundtrip(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", registered(debug=False))
def test_full_size_autoencoder_runs_off_the_cpu(name):
    _roundtrip(name)


@pytest.mark.parametrize("parts,pack", [({"z": (4, 3, 4, 4)}, False),
                                        ({"content": (4, 1, 4, 4), "global": (2, 4, 3), "detailed": (4, 3, 5)}, False),
                                        ({"z": (3, 5, 4, 4)}, True)])
def test_dit_training_step_off_the_cpu(parts, pack):
    from launch.train import FlowConfig, flow_draws, flow_step_loss, sample_generators

    torch.manual_seed(0)
    model = dit.build("dit-debug", parts, num_classes=4, text_dim=8, attn_layout="factorized")
    if pack:
        items = [Latent({"z": torch.randn(1, 3, n, 4, 4)}, "varlen", aux={"length": torch.tensor([n])}) for n in (5, 2)]
        latent = Latent.collate(items)
    else:
        latent = Latent({k: torch.randn(2, *s) for k, s in parts.items()})
    fcfg = FlowConfig(cond_dropout=0.5)
    draws = flow_draws(latent, fcfg, sample_generators(0, [0, 1]))
    cond = Cond(text=torch.randn(2, 3, 8), text_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]).bool(),
                class_id=torch.tensor([1, -1]))
    with OffDevice() as dev:
        m = off(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
        lat = latent.to(OFF)
        c = Cond(*off([cond.text, cond.text_mask, None, cond.class_id]))
        d = off(draws)
        dev.syncs.clear()
        loss = flow_step_loss(m, lat, c, fcfg, d, m.null_cond, pack=pack)
        loss.backward()
        opt.step()
        syncs = dict(dev.syncs)
        assert loss.device == OFF and torch.isfinite(loss.cpu())
    # one grid part (full or factorised attention) never waits for the device; packing varlen rows
    # sizes the packed row from the lengths on the host, and factorised attention over several
    # parts (Hi-VAE's content + motion tokens) groups ragged sets of tokens by their positions
    assert bool(syncs) == (pack or len(parts) > 1), syncs


def _ae_training_step(name: str, stage: int | None) -> None:
    """One step of `ldm train-ae` (`AETrainer.train_step`'s parts) with every tensor off the CPU:
    ``train_forward``, the generator loss (KL, the 3D Haar DWT term, the GAN term with its adaptive
    weight), gradient clipping, AdamW, then the discriminator's hinge loss and update. Hi-VAE trains
    without the GAN (its decoder samples a diffusion model)."""
    from autoencoders.losses import AELoss, AELossConfig

    torch.manual_seed(0)
    ae = (autoencoders.build(name) if stage is None else autoencoders.build(name, stage=stage)).train()
    video, cond = example_batch(ae)
    gan = 0.0 if ae.family == "hivae" else 0.5
    loss_fn = AELoss(AELossConfig(kl_weight=1e-6, dwt_weight=0.1, gan_weight=gan, disc_start=0))
    with OffDevice():
        m, lf, v = off(ae), off(loss_fn), off(video)
        c = None if cond is None else Cond(*off([cond.text, cond.text_mask, None, None]))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        out = m.train_forward(v, c)
        total, _ = lf.generator_loss(v, out, 1, m.last_layer() if gan else None, m.recon_trained)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        assert total.device == OFF and torch.isfinite(total.cpu())
        if gan:
            d_opt = torch.optim.AdamW(lf.discriminator.parameters(), lr=1e-4)
            d_loss, _ = lf.discriminator_loss(v, out.recon)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            assert torch.isfinite(d_loss.cpu())
        assert all(p.device == OFF for p in m.parameters())


def _stages(names: list[str]) -> list[tuple[str, int | None]]:
    return [(n, s) for n in names for s in (None, *autoencoders.REGISTRY[n][0].stages)]


@pytest.mark.parametrize("name,stage", [("kl2d-f8c4-debug", None), ("hivae-s-debug", 1), ("mtcvae-c4-debug", 2)])
def test_autoencoder_training_step_off_the_cpu(name, stage):
    _ae_training_step(name, stage)


@pytest.mark.slow
@pytest.mark.parametrize("name,stage", _stages(registered(debug=True)))
def test_every_autoencoder_training_step_off_the_cpu(name, stage):
    _ae_training_step(name, stage)


@pytest.mark.parametrize("method", sorted(samplers.SAMPLERS))
def test_samplers_with_guidance_off_the_cpu(method):
    torch.manual_seed(0)
    model = dit.build("dit-debug", {"z": (4, 2, 4, 4)}, num_classes=4)
    with OffDevice() as dev, torch.no_grad():
        m = off(model)
        x = Latent(samplers.initial_noise({"z": (4, 2, 4, 4)}, 2, seed=0, device=OFF))
        cond = Cond(class_id=torch.tensor([0, 3], device=OFF))
        dev.syncs.clear()
        out = samplers.sample(m, x, cond, method=method, steps=3, guidance_scale=4.0, null_cond=m.null_cond(cond))
        assert not dev.syncs, dict(dev.syncs)  # the sampling loop never waits for the device
        assert out["z"].device == OFF and torch.isfinite(out["z"].cpu()).all()


@pytest.mark.parametrize("ae_name", ["causal3d-f4x8c4-debug", "cmvae-z4-text-debug", "mtcvae-c4-debug",
                                     "hivae-s-debug"])
def test_sample_and_decode_path_off_the_cpu(ae_name):
    """``ldm sample``'s ``generate``: noise, guided sampling, statistics undone, decode."""
    from launch.sample import generate
    from ldm.samplers import SamplingConfig
    from ldm.text import build_text_encoder

    torch.manual_seed(0)
    ae = autoencoders.build(ae_name).eval()
    T, H, W = ae.example_clip()
    spec = ae.latent_spec(T, H, W)
    text = build_text_encoder("builtin")
    model = dit.build("dit-debug", spec.parts, text_dim=text.dim).eval()
    stats = {k: {"mean": [0.1] * (s[0] if len(s) == 4 else s[-1]), "std": [2.0] * (s[0] if len(s) == 4 else s[-1])}
             for k, s in spec.parts.items()}
    with OffDevice() as dev:
        m, a, t = off(model), off(ae), off(text)
        dev.syncs.clear()
        videos = generate(m, a, stats, prompts=["a red circle", "a blue square"], frames=T,
                          height=H, width=W, sampling=SamplingConfig(steps=2, guidance=3.0), text_encoder=t,
                          device=OFF, progress=False)
    if not ae_name.startswith("mtcvae"):  # (its variable-length latents are grouped by ids on the host)
        assert dev.syncs == {"copy to host": 1}, dict(dev.syncs)  # the videos, once, at the end
    videos = videos if isinstance(videos, list) else list(videos)
    assert len(videos) == 2 and all(type(v) is torch.Tensor and torch.isfinite(v).all() for v in videos)


def test_varlen_id_bookkeeping_happens_once_per_forward_not_per_block():
    """Padded or packed varlen rows group tokens by ids on the host (sizes of the groups): every
    block passes the same ids, so the grouping is done once per forward, whatever the depth."""
    items = [Latent({"z": torch.randn(1, 3, n, 4, 4)}, "varlen", aux={"length": torch.tensor([n])}) for n in (5, 2)]
    latent = Latent.collate(items)
    syncs = {}
    for depth in (2, 6):
        for pack in (False, True):
            torch.manual_seed(0)
            model = dit.build("dit-debug", {"z": (3, 5, 4, 4)}, text_dim=8, depth=depth).eval()
            cond = Cond(text=torch.randn(2, 3, 8), text_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
            with OffDevice() as dev, torch.no_grad():
                m, lat, c = off(model), latent.to(OFF), Cond(*off([cond.text, cond.text_mask, None, None]))
                dev.syncs.clear()
                m(lat, torch.rand(2, device=OFF), c, pack=pack)
                syncs[depth, pack] = sum(dev.syncs.values())
    assert syncs[2, False] == syncs[6, False] > 0 and syncs[2, True] == syncs[6, True] > 0, syncs


@pytest.mark.parametrize("name", registered(debug=True))
def test_autoencoder_runs_with_bf16_weights(name):
    """What `make gpu-check` and the inference verbs' `--dtype bf16` run on a GPU: weights and
    video cast to bf16, no autocast. A layer that mixes float32 activations with bf16 parameters
    fails here as on CUDA (cmvae's temporal attention normalised a float32 copy on the H100).
    The clip is 16x16 where the model takes it (2x2 latents at 8x): the CPU's bf16 convolutions
    are its slow reference kernels, and the dtypes do not depend on the size."""
    torch.manual_seed(0)
    ae = autoencoders.build(name).eval().to(torch.bfloat16)
    T, H, W = ae.example_clip()
    with contextlib.suppress(ValueError):
        ae.check_input(T, 16, 16)
        H = W = 16
    video = (torch.rand(1, 3, T, H, W) * 2 - 1).to(torch.bfloat16)
    cond = text_cond(ae, 1)
    if cond is not None:
        cond = dataclasses.replace(cond, text=cond.text.to(torch.bfloat16))
    with torch.no_grad():
        out = ae.decode(ae.encode(video, cond), cond)
    assert out.dtype == torch.bfloat16 and out.shape[:2] == (1, 3) and torch.isfinite(out.float()).all()


def test_a_uint8_clip_becomes_float32_on_the_device_bit_for_bit_without_waiting():
    """`ldm extract`'s clips at the target size reach the device as uint8 and become float32 there
    (`data.video.uint8_to_float`, a lookup of the decoder's values): on a device the very floats of
    the CPU path, queued without a host sync."""
    from data.video import UINT8_VALUES, uint8_to_float

    clip = torch.arange(256, dtype=torch.uint8).reshape(1, 4, 8, 8).expand(3, 4, 8, 8)  # (C, T, H, W)
    with OffDevice() as dev:
        values, on_device = off(UINT8_VALUES), off(clip)
        dev.syncs.clear()
        out = uint8_to_float(on_device, values)
        assert out.device == OFF and out.dtype == torch.float32 and not dev.syncs
        back = out.cpu()
    assert torch.equal(back, uint8_to_float(clip, UINT8_VALUES))
    assert torch.equal(back, clip.float() / 127.5 - 1.0)  # the CPU's division: the floats the shards always had


def test_a_batchs_latent_statistics_are_reduced_on_the_device_without_waiting():
    """`ldm extract` sums each batch's per-channel statistics where the latents are
    (`data.shards.channel_sums`): on a device, queued without a host sync; the same statistics as
    `ChannelStats.update` on the host (which was 0.7 ms a clip of the loop's host time for h3ae's
    256-channel latents, in float64 copies)."""
    from data.shards import ChannelStats, channel_sums

    g = torch.Generator().manual_seed(0)
    latent = Latent({"z": torch.randn(3, 6, 2, 4, 4, generator=g) * 3 + 1, "g": torch.randn(3, 4, 5, 7, generator=g)},
                    "grid", {"z": torch.randn(3, 6, 2, 4, 4, generator=g)})
    with OffDevice() as dev:
        on = latent.to(OFF)
        dev.syncs.clear()
        sums = channel_sums(on)
        assert not dev.syncs and all(rows.device == OFF for rows, _ in sums.values())
        sums = {k: (rows.cpu(), n) for k, (rows, n) in sums.items()}
    device, host = ChannelStats(), ChannelStats()
    device.add_sums(sums)
    host.update(latent)
    assert {k: len(v) for k, v in device.sums["z"].items()} == {"m": 6, "m2": 6, "var": 6} and "var" not in device.sums["g"]
    assert device.counts == host.counts == {"z": 3 * 2 * 4 * 4, "g": 3 * 4 * 5}
    for part in ("z", "g"):
        for k, v in host.sums[part].items():
            torch.testing.assert_close(torch.tensor(device.sums[part][k]), torch.tensor(v))
    ref = latent["z"].double().transpose(0, 1).reshape(6, -1)
    torch.testing.assert_close(torch.tensor(device.summary()["z"]["std"], dtype=torch.float64), ref.std(1, unbiased=False))

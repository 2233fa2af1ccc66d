"""Each sampled video's noise comes from its own seed: a video is the same alone or in a batch, at
any batch size and row, so one video of an ``index.json`` can be made again from its seed (was: one
generator per batch, seeded with the batch's first video, so a video changed with the batch size
and its neighbours)."""
import json
import warnings

import pytest
import torch
from dits import randomize
from procs import one_thread

import autoencoders
import dit
from launch.cli import main as ldm
from launch.sample import generate, sample_latents
from ldm import config as cfglib
from ldm import samplers
from ldm.artifacts import AERecord, ClipSpec
from ldm.samplers import SamplingConfig
from ldm.text import build_text_encoder


def test_noise_per_seed_is_each_rows_own_seed():
    shapes = {"z": (2, 3, 4), "s": (5,)}
    batch = samplers.noise_per_seed(shapes, [4, 9, 4])
    for row, seed in enumerate([4, 9, 4]):
        alone = samplers.initial_noise(shapes, 1, seed=seed)
        assert all(torch.equal(batch[k][row:row + 1], alone[k]) for k in shapes)
    assert not torch.equal(batch["z"][0], batch["z"][1])


def _text_dit():
    text = build_text_encoder("builtin")
    ae = autoencoders.build("kl2d-f8c4-debug").eval()
    torch.manual_seed(0)
    model = randomize(dit.build("dit-debug", ae.latent_spec(4, 16, 16), text_dim=text.dim, num_classes=4)).eval()
    return model, ae, dict(frames=4, height=16, width=16, text_encoder=text)


def test_a_sample_is_the_same_alone_or_in_a_batch():
    """Prompts of different lengths (padded together in the batch), classes and guidance: each row of
    a batch of 3 is the sample made alone with its seed (``seed_offset`` = its number, or ``seeds``)."""
    model, ae, kw = _text_dit()
    prompts = ["a red circle moving left", "a blue square", "a small green triangle moving up"]
    kw.update(sampling=SamplingConfig(steps=2, guidance=3.0, seed=5), progress=False)
    batch, _ = sample_latents(model, ae, {}, prompts=prompts, class_ids=[1, 2, 3], **kw)
    for i in range(3):
        alone, _ = sample_latents(model, ae, {}, prompts=prompts[i:i + 1], class_ids=[i + 1], seed_offset=i, **kw)
        torch.testing.assert_close(alone["z"], batch["z"][i:i + 1], atol=1e-5, rtol=1e-5)
    again, _ = sample_latents(model, ae, {}, prompts=prompts[2:], class_ids=[3], seeds=[7], **kw)
    torch.testing.assert_close(again["z"], batch["z"][2:], atol=1e-5, rtol=1e-5)  # seed 5 + 2
    with pytest.raises(ValueError, match="2 seeds for 1 samples"):
        sample_latents(model, ae, {}, prompts=prompts[:1], seeds=[1, 2], **kw)


@pytest.mark.parametrize("name,frames,extra", [("hivae-s-debug", 8, "image"), ("mtcvae-c4-debug", 34, "varlen")])
def test_token_set_image_to_video_and_varlen_videos_do_not_depend_on_their_batch(name, frames, extra):
    """Hi-VAE (token sets, a first frame held fixed, a diffusion decoder drawing its own noise) and
    MTC-VAE (variable-length latents, decoded one by one): row i of a batch is video i made alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        ae = autoencoders.build(name, **({"selector": "h264"} if extra == "varlen" else {})).eval()
    torch.manual_seed(0)
    model = randomize(dit.build("dit-debug", ae.latent_spec(frames, 32, 32), num_classes=4)).eval()
    kw = dict(frames=frames, height=32, width=32, progress=False, sampling=SamplingConfig(steps=2, seed=3))
    if extra == "image":
        kw["image"] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = generate(model, ae, {}, class_ids=[1, 2, 3], **kw)
    for i in (1, 2):
        alone = generate(model, ae, {}, class_ids=[i + 1], seed_offset=i, **kw)
        torch.testing.assert_close(alone[0], batch[i], atol=1e-4, rtol=1e-4)


def test_resume_makes_a_deleted_video_again_from_its_seed(tmp_path, capsys):
    """A video listed in index.json whose files the user deleted is made again by --resume, the same
    video from its recorded seed, its index entry once (was: "nothing to do", the video stayed gone). At one
    thread: on several, a batch of 2 rounds differently from one of 3 and a GIF pixel may move by one level."""
    cls, config = autoencoders.REGISTRY["kl2d-f8c4-debug"]
    spec = cls(config).latent_spec(4, 16, 16)
    dcfg = dit.make_config("dit-debug", spec, num_classes=3)
    torch.manual_seed(0)
    context = dit.Export(autoencoder=AERecord(name="kl2d-f8c4-debug", family="kl2d", config=cfglib.to_dict(config)),
                         video=ClipSpec(4, 16, 16), latent_spec=spec.to_dict(), form="grid", num_classes=3)
    dit.save_export(tmp_path / "dit" / "export", randomize(dit.VideoDiT(dcfg)).state_dict(), dcfg, context)
    out = tmp_path / "s"
    argv = ["sample", "--checkpoint", str(tmp_path / "dit"), "--class", "1", "--num-per-prompt", "3", "--steps", "1",
            "--seed", "5", "--output", str(out), "--device", "cpu"]
    with warnings.catch_warnings(), one_thread():
        warnings.simplefilter("ignore")
        ldm(argv)
        first = {p.name: p.read_bytes() for p in out.iterdir()}
        (out / "0001.mp4").unlink()
        (out / "0002.gif").unlink()
        capsys.readouterr()
        ldm(argv + ["--resume"])
    assert "making again 0001.mp4, 0002.mp4" in capsys.readouterr().out
    again = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {k: again[k] for k in first if not k.startswith("grid")} == {k: v for k, v in first.items()
                                                                        if not k.startswith("grid")}
    assert [(e["file"], e["seed"]) for e in json.loads((out / "index.json").read_text())] == [
        ("0000.mp4", 5), ("0001.mp4", 6), ("0002.mp4", 7)]

"""The variable-rate generation path end to end (MTC-VAE, Alg. 2): extract clips with mixed motion
into variable-length latents with segment rates -> train a DiT on varlen batches (padded and packed)
-> sample with a latent length / rate budget -> split at predicted keyframes -> decode to videos
whose frame count follows the segments."""
import json
from pathlib import Path

import pytest
import torch

import autoencoders
from autoencoders.mtcvae import MTCVAE
from data.manifest import load_manifest
from data.shards import read_all
from data.synth import render_clip
from data.video import probe, read_video, write_frames
from launch.cli import main as ldm
from dit import load_export
from launch.sample import generate, sample_latents
from launch.train import TrainConfig, train
from ldm import config as cfglib
from ldm.samplers import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE, SEG = 32, 17


def _mixed_clip(i: int) -> torch.Tensor:
    """uint8 (34, H, W, 3): one segment holding a still frame, one with fast motion (order by i)."""
    attrs = dict(shape=("circle", "square")[i % 2], color=("red", "green", "blue")[i % 3],
                 direction=("left", "right", "up", "down")[i % 4], speed="fast", background="noise")
    fast = torch.from_numpy(render_clip(attrs, SEG, SIZE, SIZE, i))
    still = torch.from_numpy(render_clip(attrs, SEG, SIZE, SIZE, 100 + i))[:1].expand(SEG, -1, -1, -1)
    return torch.cat([still, fast] if i % 2 == 0 else [fast, still])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("varlen")
    videos = base / "videos"
    (videos / "clips").mkdir(parents=True)
    rows = []
    for i in range(4):
        write_frames(videos / "clips" / f"{i:03d}.mp4", _mixed_clip(i).numpy(), fps=8)
        rows.append({"file": f"clips/{i:03d}.mp4", "caption": "still then moving" if i % 2 == 0 else
                     "moving then still", "class_id": i % 2})
    (videos / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # an MTC-VAE (random weights, H.264 selector) whose keyframe embedding + predictor are fitted
    # (stage 2's BCE) on these clips, so generated latents can be split
    torch.manual_seed(0)
    ae = autoencoders.build("mtcvae-c4-debug", selector="h264")
    clips = torch.stack([read_video(videos / "clips" / f"{i:03d}.mp4", 2 * SEG, SIZE, SIZE) for i in range(4)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        raw = ae._encode_at(clips, torch.tensor((4, 8, 16))[torch.randint(3, (4, 2), generator=g)], mark=False)
    opt = torch.optim.Adam([ae.keyframe_embed, *ae.predictor.parameters()], lr=1e-2)
    for _ in range(80):
        loss = ae.keyframe_bce(ae.mark_keyframes(raw))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ae.save_pretrained(base / "ae", name="mtcvae-c4-debug")

    ldm(["extract", "--checkpoint", str(base / "ae"), "--input", str(videos), "--output", str(base / "lat"),
         "--frames", str(2 * SEG), "--height", str(SIZE), "--width", str(SIZE), "--shard-size", "2",
         "--verify", "1"])
    return base


def test_extraction_stores_variable_length_latents_with_rates(pipeline):
    manifest = load_manifest(pipeline / "lat")
    assert manifest.form == "varlen" and manifest.counts.written == 4
    assert manifest.latent_spec["vcpr_per_rate"] == {"4": 256.0, "8": 512.0, "16": 1024.0}
    assert manifest.verify["psnr"] > 0
    ae = autoencoders.load_pretrained(pipeline / "ae").eval()
    for s in read_all(pipeline / "lat"):
        lat = s["latent"]
        rates = lat.aux["rates"][0].tolist()
        still_first = s["meta"]["index"] % 2 == 0
        assert rates == ([16, 4] if still_first else [4, 16])  # the selector follows the motion
        assert lat.aux["length"].item() == lat["z"].shape[2] == 2 + 5
        assert lat.aux["keyframe"][0].tolist() == ([1, 0, 1, 0, 0, 0, 0] if still_first else [1, 0, 0, 0, 0, 1, 0])
        # the stored latent without its rates (as a DiT would emit it): the predictor finds them
        segs = ae.split(lat.replace(aux={"length": lat.aux["length"]}))[0]
        assert [x.rate for x in segs] == rates


def _train_cfg(pipeline, out, **over):
    items = [f"data.shards={pipeline / 'lat'}", f"output={out}", "data.batch_size=2", "data.shuffle=1",
             "log_every=1", "optim.warmup_steps=1", "model.text_cond=false", "flow.cond_dropout=0"]
    return cfglib.load_yaml(ROOT / "launch" / "configs" / "train-debug.yaml", TrainConfig,
                            items + [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def trained(pipeline):
    padded = train(_train_cfg(pipeline, pipeline / "dit-padded", steps=2, save_every=2))
    packed = train(_train_cfg(pipeline, pipeline / "dit-packed", steps=2, save_every=2, **{"model.pack": "true"}))
    return padded, packed


def test_dit_trains_on_varlen_batches_padded_and_packed(trained):
    padded, packed = trained
    assert len(padded["losses"]) == 2 and all(torch.isfinite(torch.tensor(padded["losses"])))
    # same weights, data and randomness: the packed path computes the padded path's loss
    assert packed["losses"][0] == pytest.approx(padded["losses"][0], rel=1e-4)


def test_the_step_gets_varlen_batches_with_their_lengths(pipeline, tmp_path, monkeypatch):
    """The trainer's reader hands the step varlen latents with their lengths (was: rebuilt as a
    grid by the DataLoader, so padding frames were attended to and counted in the loss)."""
    import launch.train as train_verb

    forms, real = [], train_verb.flow_step_loss
    monkeypatch.setattr(train_verb, "flow_step_loss", lambda model, latent, *a, **k: forms.append(
        (latent.form, latent.aux.get("length"))) or real(model, latent, *a, **k))
    train(_train_cfg(pipeline, tmp_path / "dit", steps=1, save_every=1))
    assert forms and all(form == "varlen" and length is not None for form, length in forms)


def test_sample_with_a_budget_splits_and_decodes(pipeline, trained, tmp_path, capsys):
    model, context = load_export(pipeline / "dit-packed")
    ae = autoencoders.resolve_record(context.autoencoder).model.eval()
    assert isinstance(ae, MTCVAE)
    length = ae.varlen_length(2 * SEG, 8.0)  # rate budget 8 -> 2 segments of 3 latent frames
    assert length == 6
    kw = dict(class_ids=[0, 1], frames=2 * SEG, height=SIZE, width=SIZE,
              sampling=SamplingConfig(steps=2, guidance=1.0, seed=3), progress=False)
    latent, _ = sample_latents(model, ae, context.latent_norm, latent_frames=length, **kw)
    assert latent.form == "varlen" and latent["z"].shape[2] == length and "rates" not in latent.aux
    segments = ae.split(latent)
    videos = generate(model, ae, context.latent_norm, latent_frames=length, **kw)
    assert [tuple(v.shape) for v in videos] == [(3, sum(s.frames for s in segs), SIZE, SIZE) for segs in segments]
    assert all(sum(s.length for s in segs) == length for segs in segments)

    out = tmp_path / "samples"
    ldm(["sample", "--checkpoint", str(pipeline / "dit-packed"), "--class", "0", "--class", "1", "--rate", "16",
         "--steps", "2", "--guidance", "1", "--output", str(out)])
    index = json.loads((out / "index.json").read_text())
    assert len(index) == 2 and (out / "grid.png").exists()
    for row in index:
        assert row["frames"] == probe(out / row["file"])["frames"] > 0
    lengths = sorted({row["frames"] for row in index})
    printed = capsys.readouterr().out
    if lengths != [2 * SEG]:  # a length other than --frames is said, not left to index.json
        assert f"frames: {', '.join(map(str, lengths))} (--frames {2 * SEG}: mtcvae splits" in printed
    else:
        assert "frames:" not in printed

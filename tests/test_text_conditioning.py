"""How captions become the DiT's text condition at extraction, in training and at sampling: a clip
without a caption, the null text, the text encoder the export records."""
import json
import warnings

import torch
from dits import randomize

import autoencoders
import dit
from data import shards
from data.synth import synth_dataset
from launch.cli import console
from launch.train import batch_cond

AE = "kl2d-f8c4-debug"


def _extract(videos, out, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return console(["extract", "--autoencoder", AE, "--input", str(videos), "--output", str(out), "--frames", "4",
                        "--height", "16", "--width", "16", "--text-encoder", "builtin", *extra])


def test_a_clip_without_a_caption_trains_the_null_text_the_dit_samples_with(tmp_path):
    """A clip without a caption caches no text tokens, and the trainer gives it the DiT's null text
    (condition dropout's, `--unconditional`'s, guidance's unconditional branch); a shard of an older
    extraction, which cached the empty caption's tokens, gets the null too (was: the tokens of
    encode(""), a condition sampling never uses)."""
    synth_dataset(tmp_path / "v", num=3, frames=4, size=16, fps=8, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "v" / "metadata.jsonl").read_text().splitlines()]
    rows[1]["caption"] = ""
    (tmp_path / "v" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _extract(tmp_path / "v", tmp_path / "lat") == 0
    samples = shards.read_all(tmp_path / "lat")
    assert [s["cond"]["caption"] == "" for s in samples] == [False, True, False]
    assert [s["cond"]["text_emb"].shape[0] for s in samples][1] == 0  # was 2: BOS + EOS of ""

    ae = autoencoders.build(AE)
    torch.manual_seed(0)
    model = randomize(dit.build("dit-debug", ae.latent_spec(4, 16, 16), text_dim=256)).eval()
    old = shards.collate(samples)  # as an older extraction cached it: the empty caption's tokens
    old["cond"]["text_emb"][1, :2] = 1.0
    old["cond"]["text_mask"][1, :2] = True
    for batch in (shards.collate(samples), old):
        cond = batch_cond(batch, model.config)
        assert cond.text_mask.sum(1).tolist()[1] == 0 and cond.text_mask[[0, 2]].any(1).all()
        x = {k: v.float() for k, v in batch["latent"].parts.items()}
        t = torch.full((3,), 0.5)
        with torch.no_grad():
            v_cond, v_null = model(x, t, cond), model(x, t, model.null_cond(cond))
        assert all(torch.equal(v_cond[k][1], v_null[k][1]) for k in v_cond)
        assert not torch.allclose(v_cond["z"][0], v_null["z"][0])


def test_a_caption_cut_at_extraction_is_reported_once(tmp_path, caplog):
    """One over-long caption: one warning naming the clip and its length, and the count at the end
    (was: the text encoder's own warning besides extraction's)."""
    synth_dataset(tmp_path / "v", num=2, frames=4, size=16, fps=8, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "v" / "metadata.jsonl").read_text().splitlines()]
    rows[1]["caption"] = "a cyan square moving up across a gradient background, then slowing down near the top"
    (tmp_path / "v" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert console(["extract", "--autoencoder", AE, "--input", str(tmp_path / "v"), "--output",
                        str(tmp_path / "lat"), "--frames", "4", "--height", "16", "--width", "16",
                        "--text-encoder", "builtin"]) == 0
    assert not [w for w in caught if "cut" in str(w.message)]
    cut = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert len(cut) == 1 and "first: videos/000001): 86 tokens" in cut[0], cut


def test_the_text_encoders_token_length_is_recorded_and_sampling_uses_it(tmp_path):
    """The manifest and the export record the text encoder's max_length; sampling builds the encoder
    with it (was: with the encoder's default, so prompts longer than the extraction's length were
    embedded differently, silently); exports that predate it use the default."""
    from dit import Export, load_text_encoder
    from ldm.artifacts import AERecord, ClipSpec
    from ldm.text import build_text_encoder, fingerprint

    synth_dataset(tmp_path / "v", num=1, frames=4, size=16, fps=8, seed=0)
    assert _extract(tmp_path / "v", tmp_path / "lat") == 0
    assert json.loads((tmp_path / "lat" / "manifest.json").read_text())["text_max_length"] == 64

    short = build_text_encoder("builtin", max_length=32)
    export = Export(AERecord(name=AE, family="kl2d"), ClipSpec(4, 16, 16), {}, "grid", text_encoder="builtin",
                    text_dim=256, text_fingerprint=fingerprint(short), text_max_length=32)
    export = Export.from_dict(export.to_dict())
    prompt = ["a red circle moving left across a gradient background, then slowing down"]
    encoder = load_text_encoder(export)
    assert encoder.max_length == 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prompt is cut to 32 tokens, as its captions were
        assert torch.equal(encoder.encode(prompt)[0], short.encode(prompt)[0])
    old = {k: v for k, v in export.to_dict().items() if k != "text_max_length"}
    assert load_text_encoder(Export.from_dict(old)).max_length == 64


def test_extract_text_max_length_sets_the_captions_length_and_binds_the_folder(tmp_path, capsys):
    """``--text-max-length N``: captions are embedded at N tokens (the length the DiT to train expects:
    Open-Sora's T5 300, CogVideoX's 226), the manifest records N (sampling cuts prompts to it, test above),
    another N on a finished folder is refused as other settings, nonsense is one line."""
    from ldm.text import build_text_encoder

    synth_dataset(tmp_path / "v", num=2, frames=4, size=16, fps=8, seed=0)
    assert _extract(tmp_path / "v", tmp_path / "lat", "--text-max-length", "24") == 0
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert manifest["text_max_length"] == 24
    caption = [s["cond"]["caption"] for s in shards.read_all(tmp_path / "lat")]
    emb = torch.stack([s["cond"]["text_emb"] for s in shards.read_all(tmp_path / "lat")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic captions are longer than 24 byte tokens: cut
        expect, mask = build_text_encoder("builtin", max_length=24).encode(caption)
    assert emb.shape[1] <= 24 and torch.allclose(emb, expect[:, :emb.shape[1]], atol=1e-6)
    assert "2 caption(s) filled the text encoder's 24 tokens" in capsys.readouterr().out
    assert _extract(tmp_path / "v", tmp_path / "lat", "--text-max-length", "32") == 2
    err = capsys.readouterr().err
    assert "other settings or inputs" in err and "text_max_length: 24 -> 32" in err, err
    assert _extract(tmp_path / "v", tmp_path / "lat", "--text-max-length", "24") == 0  # the same: nothing to do
    for bad, words in (("1", "must be >= 2 tokens"), ("-3", "must be >= 2 tokens")):
        assert _extract(tmp_path / "v", tmp_path / "x", "--text-max-length", bad) == 2
        assert words in capsys.readouterr().err
    assert console(["extract", "--autoencoder", AE, "--input", str(tmp_path / "v"), "--output", str(tmp_path / "y"),
                    "--text-max-length", "24"]) == 2
    assert "give --text-encoder too" in capsys.readouterr().err


def test_an_empty_prompt_samples_the_null_text_as_uncaptioned_clips_trained():
    """An empty prompt (`ldm eval gen --reference` with a clip without a caption) samples with the null
    text, the condition such clips trained (was: the tokens of encode("")): with guidance its video is
    the unconditional one of its seed."""
    from launch.sample import sample_latents
    from ldm.samplers import SamplingConfig
    from ldm.text import build_text_encoder

    text = build_text_encoder("builtin")
    ae = autoencoders.build(AE).eval()
    torch.manual_seed(0)
    model = randomize(dit.build("dit-debug", ae.latent_spec(4, 16, 16), text_dim=text.dim)).eval()
    kw = dict(frames=4, height=16, width=16, text_encoder=text, progress=False,
              sampling=SamplingConfig(steps=2, guidance=3.0))
    both, _ = sample_latents(model, ae, {}, prompts=["a red circle moving left", ""], seeds=[3, 4], **kw)
    null, _ = sample_latents(model, ae, {}, count=1, seeds=[4], **kw)
    torch.testing.assert_close(both["z"][1:], null["z"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both["z"][:1], sample_latents(model, ae, {}, count=1, seeds=[3], **kw)[0]["z"])

"""The latent contract carries all three latent forms end to end: encode -> shard -> read -> decode."""
import pytest
import torch

import autoencoders
from data import shards
from ldm.latent import Latent, LatentSpec

import fakes  # noqa: F401  (registers the fake autoencoders)


def _videos(frames=8, size=16):
    g = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1
    static = (torch.rand(1, 3, 1, size, size, generator=g) * 2 - 1).expand(1, 3, frames, size, size)
    return torch.cat([moving, static])


@pytest.mark.parametrize("name", sorted(fakes.FAKES))
def test_encode_shard_read_decode(name, tmp_path):
    ae = autoencoders.build(name)
    video = _videos()
    latent = ae.encode(video)
    spec = ae.latent_spec(*video.shape[2:])
    for part, shape in latent.shapes().items():
        if latent.form == "varlen":  # the spec gives the longest possible latent
            assert shape[0] == spec.parts[part][0] and shape[1] <= spec.parts[part][1]
        else:
            assert shape == spec.parts[part]
    samples = [shards.encode_sample(lat, {"index": i, "caption": f"clip {i}", "class_id": i})
               for i, lat in enumerate(latent.unbatch())]
    shards.write_shard(tmp_path / "shard-000000.tar", samples, [f"{i:09d}" for i in range(len(samples))])
    read = list(shards.LatentShards(str(tmp_path)))
    assert [s["cond"]["caption"] for s in read] == ["clip 0", "clip 1"]
    batch = shards.collate(read)
    back = batch["latent"]
    assert back.form == latent.form and set(back) == set(latent)
    for part in latent:
        torch.testing.assert_close(back[part], latent[part])
        if part in latent.logvar:
            torch.testing.assert_close(back.logvar[part], latent.logvar[part])
    for k in latent.aux:
        torch.testing.assert_close(back.aux[k], latent.aux[k])
    assert ae.decode(back).shape == video.shape
    assert batch["cond"]["class_id"].tolist() == [0, 1]


def test_varlen_lengths_follow_content():
    ae = autoencoders.build("fake-varlen-debug")
    latent = ae.encode(_videos())
    assert latent.aux["length"].tolist() == [4, 2]  # moving: 2 per 4-frame segment; static: 1
    assert latent.padding_mask().tolist() == [[True] * 4, [True, True, False, False]]
    per = latent.unbatch()
    assert per[1]["z"].shape[2] == 2 and per[1].aux["keyframe"].tolist() == [[True, True]]
    again = Latent.collate(per)
    torch.testing.assert_close(again["z"], latent["z"])


def test_sample_uses_logvar_and_scaling_round_trips():
    ae = autoencoders.build("fake-grid-debug", latent_scale=(0.5,), latent_shift=(0.1,))
    raw = autoencoders.build("fake-grid-debug")
    raw.load_state_dict(ae.state_dict())
    v = _videos()
    a, b = ae.encode(v), raw.encode(v)
    torch.testing.assert_close(a["z"], (b["z"] - 0.1) * 0.5)
    torch.testing.assert_close(ae.decode(a), raw.decode(b))
    s1, s2 = a.sample(torch.Generator().manual_seed(1)), a.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(s1["z"], s2["z"])
    assert not torch.allclose(s1["z"], a["z"]) and not s1.logvar


def test_latent_spec_arithmetic():
    spec = LatentSpec("tokens", {"content": (4, 1, 32, 32), "global": (8, 8, 4), "detailed": (16, 16, 8)},
                      (3, 17, 256, 256))
    assert spec.latent_elements == 4096 + 256 + 2048
    assert spec.tokens((1, 2, 2)) == 256 + 64 + 256
    assert spec.compression_factor == pytest.approx(3 * 17 * 256 * 256 / 6400)
    with pytest.raises(ValueError):
        Latent({"z": torch.zeros(1, 2)}, "varlen")  # varlen needs lengths
    with pytest.raises(ValueError):
        Latent({"z": torch.zeros(1, 2)}, "bogus")


def test_build_errors_and_save_load(tmp_path):
    with pytest.raises(KeyError, match="unknown autoencoder"):
        autoencoders.build("nope")
    with pytest.raises(ValueError, match="unknown override"):
        autoencoders.build("fake-grid-debug", channelz=3)
    ae = autoencoders.build("fake-grid-debug", channels=6)
    ae.save_pretrained(tmp_path / "ae", name="fake-grid-debug")
    back = autoencoders.load_pretrained(tmp_path / "ae")
    assert back.config == ae.config
    v = _videos()
    torch.testing.assert_close(back.encode(v)["z"], ae.encode(v)["z"])
    with pytest.raises(ValueError, match="B C T H W"):
        ae.encode(v[0])

"""Latent shard writing/reading: statistics, validation, splitting, shuffling, resume, bad data."""
import io
import math
import tarfile
from collections import Counter

import pytest
import torch

from data import shards
from ldm.errors import UserError
from ldm.latent import Latent


def _write(tmp_path, n_shards=3, per=5, c=4):
    g = torch.Generator().manual_seed(0)
    idx = 0
    for j in range(n_shards):
        samples, keys = [], []
        for _ in range(per):
            lat = Latent({"z": torch.randn(1, c, 2, 3, 3, generator=g) + idx}, "grid",
                         {"z": torch.zeros(1, c, 2, 3, 3)})
            samples.append(shards.encode_sample(lat, {"index": idx, "caption": f"c{idx}", "class_id": idx % 3}))
            keys.append(f"{idx:09d}")
            idx += 1
        shards.write_shard(tmp_path / shards.SHARD_NAME.format(j), samples, keys)
    return idx


def _indices(ds):
    return [s["meta"]["index"] for s in ds]


def test_channel_stats_match_torch():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 2, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1) for _ in range(3)]
    st, other = shards.ChannelStats(), shards.ChannelStats()
    st.update(Latent({"z": xs[0]}))
    other.update(Latent({"z": xs[1]}))
    other.update(Latent({"z": xs[2]}))
    st.merge(shards.ChannelStats.from_json(other.to_json()))
    allx = torch.cat(xs).transpose(0, 1).reshape(3, -1).double()
    summ = st.summary()["z"]
    torch.testing.assert_close(torch.tensor(summ["mean"], dtype=torch.float64), allx.mean(1))
    torch.testing.assert_close(torch.tensor(summ["std"], dtype=torch.float64), allx.std(1, unbiased=False))
    post = shards.ChannelStats()
    post.update(Latent({"z": xs[0]}, logvar={"z": torch.full_like(xs[0], math.log(4.0))}))
    var_mean = xs[0].transpose(0, 1).reshape(3, -1).double().var(1, unbiased=False)
    torch.testing.assert_close(torch.tensor(post.summary()["z"]["sample_std"], dtype=torch.float64),
                               (var_mean + 4.0).sqrt())
    tok = shards.ChannelStats()
    tok.update(Latent({"g": torch.ones(2, 4, 8, 5)}, "tokens"))  # channels last for token sets
    assert len(tok.summary()["g"]["mean"]) == 5


def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path):
    n = _write(tmp_path)
    seen = []
    for rank in range(2):
        ds = shards.LatentShards(str(tmp_path), rank=rank, world_size=2, shuffle=4, seed=3)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        seen += _indices(loader)
    assert sorted(seen) == list(range(n))


def test_shard_split_and_determinism(tmp_path):
    n = _write(tmp_path)
    a = [_indices(shards.LatentShards(str(tmp_path), rank=r, world_size=3, split="shard", seed=1)) for r in range(3)]
    assert sorted(sum(a, [])) == list(range(n)) and all(len(x) == 5 for x in a)
    one = _indices(shards.LatentShards(str(tmp_path), shuffle=8, seed=7))
    assert one == _indices(shards.LatentShards(str(tmp_path), shuffle=8, seed=7))
    assert one != _indices(shards.LatentShards(str(tmp_path), shuffle=8, seed=8))
    with pytest.raises(ValueError, match="at least 4 shards"):
        list(shards.LatentShards(str(tmp_path), rank=0, world_size=4, split="shard"))


def test_infinite_epochs_and_skip_resume(tmp_path):
    n = _write(tmp_path)
    stream = iter(shards.LatentShards(str(tmp_path), epochs=None, shuffle=4, seed=2))
    first = [next(stream) for _ in range(2 * n + 3)]
    epochs = Counter(s["meta"]["epoch"] for s in first)
    assert epochs[0] == n and epochs[1] == n and epochs[2] == 3
    assert sorted(s["meta"]["index"] for s in first[:n]) == list(range(n))
    resumed = iter(shards.LatentShards(str(tmp_path), epochs=None, shuffle=4, seed=2, skip=n + 4))
    assert [next(resumed)["meta"]["index"] for _ in range(5)] == [s["meta"]["index"] for s in first[n + 4:n + 9]]
    res = iter(shards.LatentShards(str(tmp_path), resample=True, seed=0))
    assert len([next(res) for _ in range(3 * n)]) == 3 * n


def _tar_with(members: dict[str, bytes], path):
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_an_endless_stream_that_can_decode_nothing_stops(tmp_path):
    """Shards whose every sample is skipped (here: another latent shape than the manifest's) stop
    an endless reader with one clear error after a few passes (was: the trainer waited forever);
    one good sample among them keeps it going."""
    wrong = shards.encode_sample(Latent({"z": torch.zeros(1, 2, 1, 3, 3)}), {"index": 0})
    _tar_with({f"00000000{i}.{k}": v for i in range(3) for k, v in wrong.items()}, tmp_path / "shard-000000.tar")
    for split, workers in (("sample", 1), ("shard", 1)):
        ds = shards.LatentShards(str(tmp_path), expect_shapes={"z": (2, 1, 2, 2)}, epochs=None, batch_size=2,
                                 split=split)
        with pytest.raises(UserError, match=r"none of the \d+ samples read .* could be used .*bad_sample"):
            next(iter(ds))
    good = shards.encode_sample(Latent({"z": torch.zeros(1, 2, 1, 2, 2)}), {"index": 3})
    _tar_with({f"00000000{i}.{k}": v for i, sample in enumerate([wrong, wrong, good]) for k, v in sample.items()},
              tmp_path / "shard-000000.tar")
    stream = iter(shards.LatentShards(str(tmp_path), expect_shapes={"z": (2, 1, 2, 2)}, epochs=None))
    assert [next(stream)["meta"]["index"] for _ in range(10)] == [3] * 10


def test_bad_samples_are_skipped_and_counted(tmp_path):
    good = shards.encode_sample(Latent({"z": torch.zeros(1, 2, 1, 2, 2)}), {"index": 0})
    nan = shards.encode_sample(Latent({"z": torch.full((1, 2, 1, 2, 2), float("nan"))}), {"index": 1})
    wrong = shards.encode_sample(Latent({"z": torch.zeros(1, 2, 1, 3, 3)}), {"index": 2})
    members = {f"000000000.{k}": v for k, v in good.items()}
    members.update({f"000000001.{k}": v for k, v in nan.items()})
    members.update({f"000000002.{k}": v for k, v in wrong.items()})
    members["000000003.json"] = b'{"index": 3}'  # latent member missing
    members["../evil/000000004.json"] = b"{}"
    members["000000005.latent.safetensors"] = b"garbage!" * 4
    members["000000005.json"] = b'{"index": 5}'
    other = shards.encode_sample(Latent({"y": torch.zeros(1, 2, 1, 2, 2)}), {"index": 6})  # not the expected part
    members.update({f"000000006.{k}": v for k, v in other.items()})
    members.update({f"000000007.{k}": v for k, v in good.items()})
    members["000000007.text.safetensors"] = b"\x10" + b"\x00" * 7 + b"{broken"  # a corrupt caption embedding
    members.update({f"000000008.{k}": v for k, v in good.items()})
    members["000000008.json"] = b'{"index": 8'  # truncated JSON
    _tar_with(members, tmp_path / "shard-000000.tar")
    ds = shards.LatentShards(str(tmp_path), expect_shapes={"z": (2, 1, 2, 2)})
    assert _indices(ds) == [0]
    assert ds.skipped["bad_sample"] == 8
    reasons = []
    for key in ("000000006", "000000007", "000000008"):
        with pytest.raises(shards.SampleError) as e:
            shards.decode_sample({"__key__": key, **{m[len(key) + 1:]: v for m, v in members.items()
                                                     if m.startswith(key + ".")}}, {"z": (2, 1, 2, 2)})
        reasons.append(str(e.value))
    assert "missing part 'z'" in reasons[0] and "unreadable text embedding" in reasons[1]
    assert "unreadable member (JSONDecodeError" in reasons[2]


def test_clip_keys_of_several_windows_read_back_in_clip_order(tmp_path):
    assert shards.clip_key(42) == shards.clip_key(42, 0) == "000000042"      # one clip per video: as always
    assert shards.clip_key(42, 34) == "000000042_000034"
    windows = [(1, 0), (0, 16), (0, 0), (1, 8), (0, 8)]                      # (video index, first frame)
    samples = [shards.encode_sample(Latent({"z": torch.zeros(1, 2, 1, 2, 2)}), {"index": i, "start_frame": f})
               for i, f in windows]
    shards.write_shard(tmp_path / shards.SHARD_NAME.format(0), samples, [shards.clip_key(i, f) for i, f in windows])
    got = [(s["meta"]["index"], s["meta"]["start_frame"]) for s in shards.read_all(tmp_path)]
    assert got == sorted(windows)
    assert len(list(shards.LatentShards(str(tmp_path)))) == 5                 # the reader accepts the keys
    assert sorted(shards.clip_key(i, f) for i, f in windows) == [shards.clip_key(i, f) for i, f in sorted(windows)]


def test_parts_read_back_in_name_order():
    """safetensors hands a blob's tensors back in a random (hash) order; the trainer draws each part's
    noise in the order of the parts, so a multi-part latent (Hi-VAE) must read back in one order in
    every process, or runs on other topologies / resumed runs compute other losses."""
    names = ["global", "detailed", "content", "motion", "b", "a"]
    lat = Latent({k: torch.zeros(1, 2, 3, 4) for k in names}, "tokens", {k: torch.zeros(1, 2, 3, 4) for k in names})
    out = shards.decode_sample({"__key__": "000000000", **shards.encode_sample(lat, {})})["latent"]
    assert list(out.parts) == list(out.logvar) == sorted(names)


def test_truncated_shard_keeps_earlier_samples(tmp_path):
    _write(tmp_path, n_shards=1, per=6)
    path = tmp_path / shards.SHARD_NAME.format(0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = shards.LatentShards(str(tmp_path))
    got = _indices(ds)
    assert 0 < len(got) < 6 and got == list(range(len(got)))
    assert ds.skipped["bad_shard"] == 1


def test_write_is_atomic_and_reproducible(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _write(tmp_path / sub, n_shards=2)
    assert shards.raw_bytes_digest(tmp_path / "a") == shards.raw_bytes_digest(tmp_path / "b")
    assert not list((tmp_path / "a").glob(".*tmp"))
    with pytest.raises(FileNotFoundError):
        shards.shard_urls(tmp_path / "missing-{000..001}.tar")


def test_collate_pads_text_embeddings(tmp_path):
    samples = []
    for i, n in enumerate([3, 5]):
        lat = Latent({"z": torch.zeros(1, 2, 1, 2, 2)})
        raw = shards.encode_sample(lat, {"index": i, "caption": "x"}, text_emb=torch.ones(n, 8))
        samples.append(shards.decode_sample({"__key__": f"{i:09d}", **raw}))
    batch = shards.collate(samples)
    assert batch["cond"]["text_emb"].shape == (2, 5, 8)
    assert batch["cond"]["text_mask"].sum(1).tolist() == [3, 5]


def test_global_stream_is_the_same_for_any_topology(tmp_path):
    _write(tmp_path)  # 15 clips in 3 shards

    def steps(world, batch, workers, n_steps, skip=0):
        """index of the clips each step consumes, over all ranks"""
        per_rank = []
        for rank in range(world):
            ds = shards.LatentShards(str(tmp_path), rank=rank, world_size=world, batch_size=batch, shuffle=8,
                                     seed=1, epochs=None, skip=skip)
            it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
            per_rank.append([next(it) for _ in range(n_steps)])
        return [sorted(i for r in per_rank for i in (m["index"] for m in r[k]["meta"])) for k in range(n_steps)]

    one = steps(1, 4, 0, 6)  # crosses an epoch boundary (15 clips)
    assert steps(2, 2, 2, 6) == one  # 2 ranks x 2 workers, same global batch
    assert steps(4, 1, 0, 6) == one
    assert steps(2, 2, 0, 3, skip=12) == one[3:]  # resume after 3 steps with another topology
    # resume after an odd number of steps with 2 workers (was: the workers took their chunks by absolute
    # index, so the loader, which starts at worker 0, swapped every pair of steps after the resume)
    assert steps(1, 4, 2, 3, skip=12) == one[3:]
    assert steps(2, 2, 2, 3, skip=12) == one[3:]
    first = [i for s in one[:3] for i in s]
    assert len(set(first)) == 12 and set(range(15)) - set(first) <= set(one[3])  # once per epoch


def test_shape_buckets_with_per_bucket_batch_sizes(tmp_path):
    samples, keys = [], []
    for i in range(12):  # two resolutions interleaved
        hw = 2 if i % 3 else 4
        samples.append(shards.encode_sample(Latent({"z": torch.full((1, 2, 1, hw, hw), float(i))}), {"index": i}))
        keys.append(f"{i:09d}")
    shards.write_shard(tmp_path / shards.SHARD_NAME.format(0), samples, keys)
    buckets = {"z=2x1x4x4": 2}  # the large latents in pairs, the small ones in fours (batch_size)
    seen = []
    for rank in range(2):
        ds = shards.LatentShards(str(tmp_path), rank=rank, world_size=2, batch_size=4, buckets=buckets, shuffle=4)
        for batch in ds:
            shape = tuple(batch["latent"]["z"].shape)
            assert shape[0] <= (2 if shape[-1] == 4 else 4)
            assert len({tuple(m.shape) for m in batch["latent"]["z"]}) == 1
            seen += [m["index"] for m in batch["meta"]]
    assert sorted(seen) == list(range(12))


class _Boom:
    """Unpickling this creates a marker file: proof that something unpickled shard data."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_members_are_never_unpickled(tmp_path):
    import pickle
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Boom(str(marker)))
    sample = shards.encode_sample(Latent({"z": torch.zeros(1, 2, 1, 2, 2)}), {"index": 0})
    members = {f"000000000.{k}": v for k, v in sample.items()}
    members.update({"000000000.pyd": payload, "000000000.pickle": payload, "000000000.pth": payload})
    _tar_with(members, tmp_path / "shard-000000.tar")
    got = list(shards.LatentShards(str(tmp_path)))
    assert len(got) == 1 and not marker.exists()
    assert shards.read_all(tmp_path)[0]["meta"]["index"] == 0 and not marker.exists()


def test_mixing_rates_give_each_folder_its_share_of_every_epoch(tmp_path):
    """``rates``: folder i's clips are read rates[i] times per epoch -- whole copies of its shards and a
    share of them drawn anew each epoch for the fraction -- deterministic in (seed, epoch), each
    sample tagged with its folder; all rates 1 is the stream without rates."""
    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir(), small.mkdir()
    _write(big, n_shards=4, per=5)  # 20 clips
    _write(small, n_shards=1, per=5)  # 5 clips
    folders = [str(big), str(small)]

    def epochs(rates, n=8):
        ds = shards.LatentShards(folders, rates=rates, epochs=n, shuffle=8, seed=4)
        counts = Counter((s["meta"]["epoch"], s["meta"]["source"]) for s in ds)
        return [(counts[e, 0], counts[e, 1]) for e in range(n)]

    mixed = epochs((0.625, 2.5))  # 12.5 big clips and 12.5 small ones per epoch: a 50/50 mix of 25 a epoch
    assert {b for b, _ in mixed} <= {10, 15} and {s for _, s in mixed} <= {10, 15}  # whole shards of 5
    assert sum(b for b, _ in mixed) == pytest.approx(8 * 12.5, rel=0.25)
    assert sum(s for _, s in mixed) == pytest.approx(8 * 12.5, rel=0.25)
    assert len({b for b, _ in mixed}) == 2  # rounded up in some epochs, down in others
    assert mixed == epochs((0.625, 2.5))  # deterministic
    assert epochs((1.0, 3.0), 2) == [(20, 15), (20, 15)]
    plain = [(s["meta"]["index"], s["meta"]["position"]) for s in shards.LatentShards(folders, epochs=2, seed=4)]
    assert plain == [(s["meta"]["index"], s["meta"]["position"])
                     for s in shards.LatentShards(folders, rates=(1.0, 1.0), epochs=2, seed=4)]
    with pytest.raises(ValueError, match="1 rates for 2 shard folders"):
        shards.LatentShards(folders, rates=(1.0,))


def test_a_start_epoch_reads_on_as_reading_through_every_epoch(tmp_path, monkeypatch):
    """``start=(epoch, its first position)`` from a sample's meta: the resumed stream is the same as
    one that skips from epoch 0, and only the epoch in progress is read (was: a resume read every
    shard of every epoch before, weeks of data for a long run)."""
    n = _write(tmp_path)  # 15 clips
    stream = iter(shards.LatentShards(str(tmp_path), epochs=None, shuffle=4, seed=2, batch_size=2))
    batches = [next(stream) for _ in range(20)]  # 40 samples: into epoch 2
    meta = batches[16]["meta"][0]
    assert (meta["epoch"], meta["epoch_start"]) == (2, 2 * n)
    opened = []
    real = shards.iter_shard
    monkeypatch.setattr(shards, "iter_shard", lambda url, counters=None: opened.append(url) or real(url, counters))
    resumed = iter(shards.LatentShards(str(tmp_path), epochs=None, shuffle=4, seed=2, batch_size=2, skip=32,
                                       start=(meta["epoch"], meta["epoch_start"])))
    assert [next(resumed)["meta"] for _ in range(4)] == [b["meta"] for b in batches[16:20]]
    assert len(opened) <= 3  # the shards of epoch 2 only
    # shape buckets (rank 1 of 2 here): the same batches as reading every epoch from the start
    kw = dict(epochs=None, shuffle=4, seed=2, batch_size=2, buckets={}, rank=1, world_size=2, skip=32)
    through = iter(shards.LatentShards(str(tmp_path), **kw))
    expected = [next(through)["meta"] for _ in range(3)]
    assert (expected[0][0]["epoch"], expected[0][0]["epoch_start"]) == (2, 30)
    opened.clear()
    resumed = iter(shards.LatentShards(str(tmp_path), start=(2, 30), **kw))
    assert [next(resumed)["meta"] for _ in range(3)] == expected and len(opened) <= 3


def test_varlen_statistics_leave_the_padding_out():
    """A varlen batch's statistics count each sample's own frames only (its padding would bias them);
    `channel_sums` takes one trimmed sample, not a padded batch."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, 5, 2, 2, generator=g), torch.randn(1, 3, 2, 2, 2, generator=g) + 4
    batch = Latent.collate([Latent({"z": a}, "varlen", aux={"length": torch.tensor([5])}),
                            Latent({"z": b}, "varlen", aux={"length": torch.tensor([2])})])
    st = shards.ChannelStats()
    st.update(batch)
    allx = torch.cat([a, b], dim=2).transpose(0, 1).reshape(3, -1).double()
    summ = st.summary()["z"]
    assert summ["count"] == 7 * 4
    torch.testing.assert_close(torch.tensor(summ["mean"], dtype=torch.float64), allx.mean(1))
    torch.testing.assert_close(torch.tensor(summ["std"], dtype=torch.float64), allx.std(1, unbiased=False))
    with pytest.raises(ValueError, match="one varlen sample"):
        shards.channel_sums(batch)

"""data.sources: folders (+ CSV / JSONL / auto metadata.jsonl captions), raw shards, brace patterns,
problems reported without crashing, VideoClipDataset."""
from __future__ import annotations

import codecs
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

import data.video as video_mod
from data.sources import ItemList, VideoClipDataset, VideoItem, list_items
from data.synth import synth_dataset
from data.video import VideoError, Window, Windows, check_video, encode_video, probe, read_video, write_frames
from launch.cli import console
from ldm.errors import UserError


def _clip(value: int, frames: int = 8) -> np.ndarray:
    return np.full((frames, 32, 32, 3), value, np.uint8)


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "videos"
    write_frames(root / "b.mp4", _clip(10), fps=8)
    write_frames(root / "a.mp4", _clip(50), fps=8)
    write_frames(root / "sub" / "c.gif", _clip(90), fps=10)
    write_frames(root / ".hidden.mp4", _clip(0), fps=8)
    (root / "notes.txt").write_text("not a video")
    return root


def test_folder_is_recursive_sorted_and_deterministic(folder):
    items = list_items(folder)
    assert isinstance(items, ItemList) and items.problems == []
    assert [it.key for it in items] == ["a", "b", "sub/c"]
    assert [it.key for it in list_items(folder)] == [it.key for it in items]
    assert all(it.caption is None and it.class_id is None for it in items)
    assert items[0].load_bytes() == (folder / "a.mp4").read_bytes()
    assert [it.key for it in list_items(folder / "sub" / "c.gif")] == ["c"]   # a single video file


def test_csv_captions_with_problems(folder, tmp_path):
    cap = tmp_path / "captions.csv"
    cap.write_text("path,caption,label\n"
                   "a.mp4,first clip,3\n"
                   "sub/c.gif,\"third, with comma\",1\n"
                   "missing.mp4,ghost,2\n"
                   "a.mp4,duplicate,4\n")
    items = list_items(folder, cap)
    by_key = {it.key: it for it in items}
    assert by_key["a"].caption == "first clip" and by_key["a"].class_id == 3
    assert by_key["sub/c"].caption == "third, with comma" and by_key["sub/c"].class_id == 1
    assert by_key["b"].caption is None and by_key["b"].class_id is None
    text = "\n".join(items.problems)
    assert "'missing.mp4' is not a video" in text and "second row for 'a.mp4'" in text
    assert "1 of 3 videos have no row" in text


def test_jsonl_captions_with_string_labels_relative_to_captions_file(folder):
    cap = folder.parent / "labels.jsonl"   # paths relative to the captions file's folder
    cap.write_text("\n".join(json.dumps(r) for r in [
        {"video": "videos/b.mp4", "text": "bee", "label": "Zebra"},
        {"file": "videos/a.mp4", "caption": "ay", "label": "Apple"},
        {"video": "videos/sub/c.gif", "text": "see", "label": "Mango", "extra": 7},
    ]) + "\n{broken\n")
    items = list_items(folder, cap)
    assert [(it.key, it.caption, it.class_id, it.meta["label"]) for it in items] == [
        ("a", "ay", 0, "Apple"), ("b", "bee", 2, "Zebra"), ("sub/c", "see", 1, "Mango")]
    assert items[2].meta["extra"] == 7
    assert any("not JSON" in p for p in items.problems)


def test_synth_folder_uses_its_metadata_automatically(tmp_path):
    synth_dataset(tmp_path / "s", 6, frames=8, size=32, seed=0)
    items = list_items(tmp_path / "s")
    assert len(items) == 6 and items.problems == []
    rows = [json.loads(x) for x in (tmp_path / "s" / "metadata.jsonl").read_text().splitlines()]
    assert [(it.caption, it.class_id, it.meta["shape"]) for it in items] == [
        (r["caption"], r["class_id"], r["shape"]) for r in rows]


def test_clear_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_items(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        list_items(folder, tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("name,caption\na.mp4,x\n")
    with pytest.raises(ValueError, match="no path column"):
        list_items(folder, tmp_path / "bad.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        list_items(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="shard"):
        list_items(str(tmp_path / "shard-{000000..000002}.tar"))


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    synth_dataset(out, 7, frames=8, size=32, seed=3, layout="shards", shard_size=3)
    return out


def test_raw_shards_directory_file_and_brace_pattern(shard_set):
    items = list_items(shard_set)
    rows = json.loads((shard_set / "synth.json").read_text())
    assert rows["count"] == 7 and [it.key for it in items] == [f"{i:06d}" for i in range(7)]
    assert items.problems == []
    assert all(it.caption.startswith("a ") and it.class_id == it.meta["class_id"] for it in items)
    one = list_items(shard_set / "shard-000001.tar")
    assert [it.key for it in one] == ["000003", "000004", "000005"]
    braced = list_items(str(shard_set / "shard-{000000..000002}.tar"))
    assert [(it.key, it.caption, it.offset) for it in braced] == [(it.key, it.caption, it.offset) for it in items]
    data = items[4].load_bytes()
    with tarfile.open(shard_set / "shard-000001.tar") as tar:
        assert data == tar.extractfile("000004.mp4").read()
    with pytest.raises(ValueError, match="shards carry their own captions"):
        list_items(shard_set, shard_set / "synth.json")


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_hand_made_shards_json_captions_duplicates_and_problems(tmp_path):
    video = encode_video(_clip(30), fps=8)
    _tar(tmp_path / "s0.tar", {
        "x/clip1.mp4": video, "x/clip1.json": json.dumps({"text": "from json", "label": 5}).encode(),
        "lonely.txt": b"no video here",
        "clip2.webm.mp4": video, "clip2.cls": b"not-a-number",
    })
    _tar(tmp_path / "s1.tar", {"x/clip1.mp4": video, "x/clip1.txt": b"again"})
    items = list_items(tmp_path)
    assert [(it.key, it.caption, it.class_id) for it in items] == [
        ("clip2", None, None), ("x/clip1", "from json", 5), ("s1/x/clip1", "again", None)]
    text = "\n".join(items.problems)
    assert "'lonely' has no video member" in text and "non-integer class" in text and "already seen" in text
    assert items[1].load_bytes() == video
    (tmp_path / "s1.tar").unlink()  # a shard gone since it was listed: its member is named
    with pytest.raises(VideoError, match=r"file not found: .*s1.tar \(the shard holding x/clip1.mp4\)"):
        items[2].load_bytes()


def test_truncated_shard_is_reported_not_fatal(shard_set, tmp_path):
    data = (shard_set / "shard-000000.tar").read_bytes()
    with tarfile.open(shard_set / "shard-000000.tar") as tar:
        member = tar.getmember("000001.mp4")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: member.offset_data + member.size // 2])   # cut inside the 2nd video
    items = list_items(cut)
    assert [it.key for it in items] == ["000000", "000001"]
    assert any("unreadable after 2 samples" in p for p in items.problems)
    assert len(items[0].load_bytes()) > 0
    with pytest.raises(VideoError, match="truncated"):
        items[1].load_bytes()


def test_video_clip_dataset(folder, tmp_path):
    (folder / "broken.mp4").write_text("garbage")
    cap = tmp_path / "c.csv"
    cap.write_text("file,text,class_id\na.mp4,hello,2\n")
    items = list_items(folder, cap)
    ds = VideoClipDataset(items, frames=4, height=16, width=16, fps=8)
    assert len(ds) == 4
    first = ds[0]
    assert first["video"].shape == (3, 4, 16, 16) and first["video"].dtype == torch.float32
    assert (first["key"], first["caption"], first["class_id"]) == ("a", "hello", 2)
    assert (ds[1]["key"], ds[1]["caption"], ds[1]["class_id"]) == ("b", "", -1)
    assert float(first["video"].mean()) == pytest.approx(50 / 127.5 - 1, abs=0.03)
    with pytest.raises(VideoError, match="not a readable video"):
        ds[[it.key for it in items].index("broken")]
    gone = VideoItem(key="gone", path=tmp_path / "gone.mp4")
    with pytest.raises(VideoError, match="file not found"):
        VideoClipDataset([gone], 4, 16, 16)[0]


def test_video_clip_dataset_windows(tmp_path, monkeypatch):
    frames = np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(20)])
    write_frames(tmp_path / "v" / "a.mp4", frames, fps=10)
    write_frames(tmp_path / "v" / "b.mp4", frames[:3], fps=10)
    ds = VideoClipDataset(list_items(tmp_path / "v"), frames=4, height=16, width=16)
    assert ds.plan(0, Windows()) == [Window(0, 0, 0.0)]                # first frames: no look at the file
    assert [w.start for w in ds.plan(0, Windows(3))] == [0, 8, 16]
    assert [w.start for w in ds.plan(0, Windows(0, stride=6))] == [0, 6, 12]
    with pytest.raises(VideoError, match="too short: has 3 frames at 10 fps, need 4 frames"):
        ds.plan(1, Windows(0, stride=6))
    clips = ds.read_windows(0, ds.plan(0, Windows(3)))
    assert [c["key"] for c in clips] == ["a"] * 3
    gray = [float(c["video"].mean() + 1) * 127.5 for c in clips]      # mean of frames s..s+3 = 10 * (s + 1.5)
    assert gray == pytest.approx([15, 95, 175], abs=3)
    assert torch.equal(ds.read_windows(0, [Window(0, 0, 0.0)])[0]["video"], ds[0]["video"])
    opened = []
    real_open = video_mod._open
    monkeypatch.setattr(video_mod, "_open", lambda src: opened.append(src) or real_open(src))
    first = ds.read_windows(0, [Window(0, 0, 0.0)])[0]
    assert len(opened) == 1 and (first["source_fps"], first["variable_rate"]) == (10.0, False)  # was: opened twice
    gone = VideoClipDataset([VideoItem(key="gone", path=tmp_path / "gone.mp4")], 4, 16, 16)
    assert gone.plan(0, Windows()) == [Window(0, 0, 0.0)]
    with pytest.raises(VideoError, match="file not found"):
        gone.read_windows(0, [Window(0, 0, 0.0)])


def test_uint8_windows_are_the_float_windows_bit_for_bit(tmp_path):
    """``read_windows(uint8=True)`` (``ldm extract``'s loader) gives every clip as uint8, at the
    target size, a center crop away from it or resized (resized ones were float32 before the resize
    ran on 8-bit pixels); the extraction loop's conversion on the device gives the float32 clip of
    ``read_windows`` bit for bit (was: every clip left the decoding workers as float32, 4x the bytes)."""
    from launch.encode_loop import _ShardEncoder

    rng = np.random.default_rng(0)
    write_frames(tmp_path / "v" / "at.mp4", rng.integers(0, 256, (10, 32, 32, 3), np.uint8), fps=10)
    write_frames(tmp_path / "v" / "big.mp4", rng.integers(0, 256, (10, 48, 40, 3), np.uint8), fps=10)
    # stored at the short side: a center crop (5 columns off the left) and no resize
    write_frames(tmp_path / "v" / "crop.mp4", rng.integers(0, 256, (10, 32, 42, 3), np.uint8), fps=10)
    ds = VideoClipDataset(list_items(tmp_path / "v"), frames=4, height=32, width=32)
    run = SimpleNamespace(device=torch.device("cpu"), ae=SimpleNamespace(encode_compiled=False))
    encoder = _ShardEncoder(run, 1, print)
    windows = [Window(0, 0, 0.0), Window(1, 6, 0.6)]
    for index in range(3):  # at the size, resized, a crop away
        small = ds.read_windows(index, windows, uint8=True)
        full = ds.read_windows(index, windows)
        assert [c["video"].dtype for c in small] == [torch.uint8] * 2
        assert [c["video"].dtype for c in full] == [torch.float32] * 2
        for a, b in zip(small, full):
            assert {k: v for k, v in a.items() if k != "video"} == {k: v for k, v in b.items() if k != "video"}
            assert torch.equal(encoder.to_float(a["video"]), b["video"])
    assert len(small[0]["video"].unique()) > 200  # decoded noise: nearly every uint8 value is checked
    encoder.writer.shutdown()
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None].repeat(3, -1)  # each value once per channel
    x, y = video_mod._to_clip([every], 16, 16, uint8=True), video_mod._to_clip([every], 16, 16)
    assert x.dtype == torch.uint8 and torch.equal(video_mod.uint8_to_float(x, video_mod.UINT8_VALUES), y)
    assert torch.equal(video_mod.UINT8_VALUES[x.int()], y)  # the lookup on an accelerator (CPU: numpy's ops)
    assert torch.equal(y, torch.from_numpy(every).permute(2, 0, 1)[:, None].float() / 127.5 - 1)  # the CPU ops


def test_shard_dataset_decodes(shard_set):
    ds = VideoClipDataset(list_items(shard_set), frames=8, height=32, width=32)
    sample = ds[6]
    assert sample["video"].shape == (3, 8, 32, 32) and sample["key"] == "000006" and sample["class_id"] >= 0


# --------------------------------------------------------------------------------------------
# real-world inputs: files made by other tools
# --------------------------------------------------------------------------------------------
ROWS = [("a.mp4", "café au lait", "3"), ("sub/c.gif", "third, with comma", "1")]


def _captions(items) -> list[tuple[str, str | None, int | None]]:
    return [(it.key, it.caption, it.class_id) for it in items]


EXPECTED = [("a", "café au lait", 3), ("b", None, None), ("sub/c", "third, with comma", 1)]


@pytest.mark.parametrize("name, header, sep, encoding", [
    ("bom.csv", "path,caption,class_id", ",", "utf-8-sig"),            # Excel's "CSV UTF-8"
    ("upper.csv", "PATH,Caption,Label", ",", "utf-8"),                  # any header case
    ("spaces.csv", " Path , CAPTION , class_id", ",", "utf-8"),
    ("semicolon.csv", "path;caption;label", ";", "utf-8"),              # European Excel
    ("tabs.tsv", "Video\tText\tLabel", "\t", "utf-8"),
    ("utf16.csv", "path,caption,label", ",", "utf-16"),                 # with a byte-order mark
    ("utf16le.tsv", "path\tcaption\tlabel", "\t", "utf-16-le"),         # without one
    ("utf16be.csv", "path,caption,label", ",", "utf-16-be"),
])
def test_captions_made_by_other_tools(folder, tmp_path, name, header, sep, encoding):
    def cell(v):
        return f'"{v}"' if sep in v else v
    lines = [header] + [sep.join(cell(v) for v in row) for row in ROWS]
    (tmp_path / name).write_bytes(("\r\n".join(lines) + "\r\n").encode(encoding))
    items = list_items(folder, tmp_path / name)
    assert _captions(items) == EXPECTED
    assert items.problems == ["1 of 3 videos have no row in " + name + " (no caption/class)"]
    assert "path" in items[0].meta and "Path" not in items[0].meta   # columns under lower-case names


def test_latin1_captions_are_read_and_reported(folder, tmp_path):
    (tmp_path / "latin1.csv").write_bytes("path,caption,label\na.mp4,café au lait,3\nsub/c.gif,\"third, with comma\",1\n"
                                          .encode("latin-1"))
    items = list_items(folder, tmp_path / "latin1.csv")
    assert _captions(items) == EXPECTED
    assert any("latin1.csv: not UTF-8; read as cp1252" in p for p in items.problems)


def test_unreadable_captions_name_the_file(folder, tmp_path):
    (tmp_path / "binary.csv").write_bytes(b"path,caption\n\x00\x01\x02\x03garbage\xff\xfe\x00")
    with pytest.raises(UserError, match="binary.csv: binary content"):
        list_items(folder, tmp_path / "binary.csv")
    (tmp_path / "bad16.csv").write_bytes(codecs.BOM_UTF16_LE + b"p\x00a\x00\x00\xd8")  # a lone surrogate
    with pytest.raises(UserError, match="bad16.csv: not valid utf-16"):
        list_items(folder, tmp_path / "bad16.csv")
    (tmp_path / "rows.txt").write_text("path,caption\na.mp4,x\n")  # CSV under a JSONL name
    with pytest.raises(UserError, match="rows.txt: no line is a JSON object"):
        list_items(folder, tmp_path / "rows.txt")
    (tmp_path / "nopath.tsv").write_text("name\tcaption\na.mp4\tx\n")
    with pytest.raises(UserError, match="nopath.tsv has no path column"):
        list_items(folder, tmp_path / "nopath.tsv")


def test_symlinked_folders_are_followed_once(tmp_path):
    outside = tmp_path / "elsewhere"
    write_frames(outside / "b.mp4", _clip(10), fps=8)
    root = tmp_path / "videos"
    write_frames(root / "real" / "a.mp4", _clip(50), fps=8)
    (root / "linked").symlink_to(outside, target_is_directory=True)         # a folder kept on another disk
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)     # a loop back to the top
    (root / "zz-again").symlink_to(root / "real", target_is_directory=True)  # a second way to one folder
    (root / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")                 # a broken link
    (root / "a-link.mp4").symlink_to(root / "real" / "a.mp4")                # a second name for a listed video
    items = list_items(root)
    assert [it.key for it in items] == ["linked/b", "real/a"]
    assert items[0].load_bytes() == (outside / "b.mp4").read_bytes()
    text = "\n".join(items.problems)
    assert "real/loop: links to a folder already listed" in text
    assert "zz-again: links to a folder already listed" in text and "gone.mp4: broken symlink" in text
    assert "a-link.mp4: the same file as real/a.mp4; skipped" in text   # was: listed twice, its clips encoded twice
    cap = tmp_path / "c.csv"
    cap.write_text("path,caption\nlinked/b.mp4,through the link\na-link.mp4,by the link's name\n")
    assert [it.caption for it in list_items(root, cap)] == ["through the link", "by the link's name"]


def test_keys_are_unique_when_stems_collide(tmp_path):
    root = tmp_path / "v"
    for name in ("bikes.mp4", "bikes.webm", "cars.mp4", "x.mp4", "x.mp4.mkv", "sub/bikes.mp4"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"listing does not open the files")
    items = list_items(root)
    assert [it.key for it in items] == ["bikes.mp4", "bikes.webm", "cars", "sub/bikes", "x", "x.mp4.mkv"]
    cap = tmp_path / "c.csv"
    cap.write_text("path,caption\nbikes.webm,the webm one\n")
    assert {it.key: it.caption for it in list_items(root, cap)}["bikes.webm"] == "the webm one"


def test_data_list_check_reports_broken_videos(folder, tmp_path, capsys):
    good = (folder / "a.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(good[: len(good) // 2])          # index (moov) lost
    (folder / "fake.mp4").write_text("<html>404 not found</html>")    # a web page saved as .mp4
    assert console(["data", "list", "--input", str(folder)]) == 0      # listing alone does not open files
    capsys.readouterr()
    assert console(["data", "list", "--input", str(folder), "--check"]) == 1
    out = capsys.readouterr().out
    assert "checked 5 videos (decoded to the end): 3 good, 2 broken:" in out
    assert "  - cut: corrupt or truncated: " in out and "  - fake: not a readable video" in out
    (folder / "cut.mp4").unlink()
    (folder / "fake.mp4").unlink()
    assert console(["data", "list", "--input", str(folder), "--check"]) == 0


def test_check_video_finds_a_file_cut_after_its_index(tmp_path):
    import av

    path = tmp_path / "faststart.mp4"   # index first (as streaming sites write): a cut file still opens
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for f in (np.random.default_rng(0).random((16, 32, 32, 3)) * 255).astype(np.uint8):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    assert check_video(path)["decoded"] == 16
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(VideoError, match="corrupt or truncated"):
        check_video(tmp_path / "cut.mp4")


def test_data_list_reports_each_captions_problem_once(folder, tmp_path, capsys, caplog):
    """``ldm data list`` prints the captions problems in its report; list_items' log warnings of
    the same problems (what ``ldm extract`` shows) are not printed a second time."""
    caps = tmp_path / "caps.csv"
    caps.write_text("path,caption\na.mp4,one\nmissing.mp4,two\na.mp4,three\n")
    caplog.set_level("WARNING")
    assert console(["data", "list", "--input", str(folder), "--captions", str(caps)]) == 0
    out = capsys.readouterr().out
    assert "3 problem(s):" in out and out.count("'missing.mp4' is not a video") == 1
    assert not [r for r in caplog.records if r.name == "data.sources"]
    caplog.clear()
    list_items(folder, caps)  # elsewhere the problems are still logged
    assert any("'missing.mp4' is not a video" in r.getMessage() for r in caplog.records)


def test_camcorder_and_broadcast_extensions_are_videos(tmp_path):
    """AVCHD camcorders write ``.MTS`` (MPEG-TS), DVDs ``.VOB``: listed and read like any video (was:
    left out without a word, as files that are not videos)."""
    root = tmp_path / "cam"
    root.mkdir()
    for name, fmt in (("00001.MTS", "mpegts"), ("VTS_01_1.VOB", "vob"), ("take.m2ts", "mpegts")):
        with av.open(str(root / name), "w", format=fmt) as c:
            s = c.add_stream("mpeg2video", rate=25)
            s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
            for frame in _clip(60):
                c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            c.mux(s.encode(None))
    items = list_items(root)
    assert [it.key for it in items] == ["00001", "VTS_01_1", "take"]
    for it in items:
        assert read_video(it.readable(), 8, 16, 16).shape == (3, 8, 16, 16)


def test_sidecar_txt_captions(folder, tmp_path):
    """``clip.txt`` next to ``clip.mp4`` is its caption (was: ignored; the videos had none); a
    captions file's row wins, an empty sidecar is no caption, any encoding `read_text` reads."""
    (folder / "a.txt").write_text("  a gray square, 猫 🎬\n", encoding="utf-8")
    (folder / "b.txt").write_text("\n")
    (folder / "sub" / "c.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    items = list_items(folder)
    assert [it.caption for it in items] == ["a gray square, 猫 🎬", None, "café au lait"]
    assert any("c.txt: not UTF-8" in p for p in items.problems)
    cap = tmp_path / "captions.csv"
    cap.write_text("path,caption\na.mp4,from the file\nb.mp4,\n")
    assert [it.caption for it in list_items(folder, cap)] == ["from the file", None, "café au lait"]


def test_data_list_shortens_long_captions(folder, tmp_path, capsys):
    cap = tmp_path / "c.jsonl"
    cap.write_text(json.dumps({"path": "a.mp4", "caption": "very" * 2500}) + "\n")
    assert console(["data", "list", "--input", str(folder), "--captions", str(cap)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  a:"))
    assert "... (10000 characters) (" in line and "None" not in line and len(line) < 400  # was: all 10,000 characters


def test_captions_paths_written_on_windows_or_macos_match(tmp_path):
    """A captions file typed on Windows (``sub\\clip.mp4``) or naming "café" in NFC while the
    file came from a Mac in NFD: its rows still find their videos (was: "not a video under")."""
    import unicodedata

    root = tmp_path / "v"
    nfd = unicodedata.normalize("NFD", "café.mp4")
    write_frames(root / nfd, _clip(10), fps=8)
    write_frames(root / "sub" / "clip.mp4", _clip(50), fps=8)
    cap = tmp_path / "c.csv"
    cap.write_text(f"path,caption\n{unicodedata.normalize('NFC', 'café.mp4')},accented\nsub\\clip.mp4,windows\n",
                   encoding="utf-8")
    items = list_items(root, cap)
    assert [it.caption for it in items] == ["accented", "windows"] and items.problems == []


def test_captions_are_stripped_and_blank_ones_are_none(folder, tmp_path):
    """Scraped captions carry line breaks and spaces around them, or only those (was: kept as they
    are, a blank caption encoded as text)."""
    cap = tmp_path / "c.jsonl"
    cap.write_text(json.dumps({"path": "a.mp4", "caption": "  a cat 🐈\r\n"}) + "\n"
                   + json.dumps({"path": "b.mp4", "caption": " \n\t"}) + "\n")
    (folder / "b.txt").write_text("from the sidecar\n")
    assert [it.caption for it in list_items(folder, cap)] == ["a cat 🐈", "from the sidecar", None]


def _gif_starts(path) -> list[int]:
    with av.open(str(path)) as c:
        return [p.pts for p in c.demux(c.streams.video[0]) if p.size]   # centiseconds


@pytest.mark.parametrize("values", [[90] * 8, [30] * 4 + [200] * 4, [0, 51] * 4], ids=["still", "paused", "blink"])
def test_gif_keeps_repeated_frames_and_their_timing(tmp_path, values):
    """A still or paused clip (as `ldm sample` can make) keeps all its frames at its rate (was: Pillow
    merged identical consecutive frames: 8 still frames came out as 1 frame at 1 fps, 4 + 4 as 2 at 2 fps);
    a blinking one every change (FFmpeg's frame differencing, on by default, compares palette indices)."""
    clip = np.stack([np.full((32, 32, 3), v, np.uint8) for v in values])
    path = tmp_path / "clip.gif"
    write_frames(path, clip, fps=8)
    info = check_video(path)
    assert info["frames"] == info["decoded"] == 8 and info["duration"] == pytest.approx(1.0)
    assert _gif_starts(path) == [0, 12, 25, 38, 50, 62, 75, 88]       # round(100 i / 8): no drift
    back = read_video(path, 8, 32, 32, fps=8)
    assert ((back[0, :, 0, 0] + 1) * 127.5).round().tolist() == values


def test_gif_frame_times_do_not_drift(tmp_path):
    """At 24 fps (4.17 cs a frame) delays alternate 4 and 5 cs, so reading at 24 fps gives every frame
    once (was: 4 cs each, 25 fps: frame 29 of 30 played at 1.16 s instead of 1.21 s)."""
    clip = np.stack([np.full((16, 16, 3), 8 * i, np.uint8) for i in range(30)])
    path = tmp_path / "ramp.gif"
    write_frames(path, clip, fps=24)
    assert _gif_starts(path) == [round(100 * i / 24) for i in range(30)]
    assert probe(path)["fps"] == pytest.approx(24, rel=0.01)             # was: 25, from the first delay (4 cs)
    back = read_video(path, 30, 16, 16, fps=24)
    assert ((back[0, :, 0, 0] + 1) * 127.5).round().tolist() == [8 * i for i in range(30)]
    write_frames(tmp_path / "fast.gif", clip, fps=120)   # faster than GIF delays go: every frame 1 cs
    assert _gif_starts(tmp_path / "fast.gif") == list(range(30))


def test_an_ldm_sample_folder_lists_each_video_once_with_its_prompt(tmp_path):
    """Re-reading `ldm sample` outputs (NNNN.mp4 + NNNN.gif + index.json): each video once, from its
    MP4, with its prompt and class id (was: 4 videos for 2, the GIF twins counted, no captions)."""
    out = tmp_path / "samples"
    for name in ("0000", "0001", "0002"):
        write_frames(out / f"{name}.mp4", _clip(40), fps=8)
        write_frames(out / f"{name}.gif", _clip(40), fps=8)
    (out / "0002.mp4").unlink()                             # a deleted MP4: its GIF is the video left
    (out / "index.json").write_text(json.dumps([{"file": f"000{i}.mp4", "prompt": p, "class_id": c, "seed": i}
                                                for i, (p, c) in enumerate([("a red circle", 3), (None, 1),
                                                                            ("gone", 2)])]))
    items = list_items(out)
    assert [(it.key, it.path.name, it.caption, it.class_id) for it in items] == [
        ("0000", "0000.mp4", "a red circle", 3), ("0001", "0001.mp4", None, 1), ("0002", "0002.gif", None, None)]
    assert items[0].meta["seed"] == 0
    assert any("'0002.mp4' is not a video" in p for p in items.problems)
    (out / "index.json").write_text('{"not": "a sample index"}')   # another tool's index.json: a plain folder
    assert len(list_items(out)) == 5

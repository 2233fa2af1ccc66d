"""Video inputs: a folder of videos (+ optional captions file) or raw WebDataset video shards.

``list_items(input, captions=None)`` returns a deterministic, sorted list of `VideoItem`:

- a folder (searched recursively; hidden files skipped) of videos with a common extension
  (`VIDEO_EXTENSIONS`); keys are the relative paths without extension, items sorted by them;
- a single video file;
- raw WebDataset shards: a ``.tar`` file, a folder holding ``.tar`` files (and no videos), or a brace
  pattern such as ``"dir/shard-{000000..000003}.tar"``. Members are grouped into samples by
  WebDataset's rule (the key is the member path up to the first dot of its base name); a sample
  needs one video member (``mp4``, ``webm``, ... or ``video``) and may have ``txt`` (caption),
  ``json`` (metadata; ``caption``/``text`` and ``class_id``/``label`` are read from it when there
  is no ``txt``/``cls``) and ``cls`` (integer class). Items are sorted by (shard, key).

Captions file (folders only): CSV with a header or JSONL, one row per video, with columns
``path | file | video`` (relative to the input folder, else to the captions file's folder, or
absolute), ``caption | text`` and ``class_id | label``. Non-integer labels (e.g. UCF-101 class
names) are numbered in sorted order and kept as ``meta["label"]``. Every column lands in
``item.meta``. A folder holding ``metadata.jsonl`` (what ``ldm data synth`` writes) uses it when no
captions file is given.

Problems that should not stop a run (a captions row naming a missing file, a duplicate row, a
shard sample without a video, an unreadable shard) are logged and collected in
``items.problems``: the returned `ItemList` is a plain list with that extra attribute. A missing
input or a captions file without a path column is an error.
"""
from __future__ import annotations

import csv
import json
import logging
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from data.video import VideoError, Window, Windows, plan_windows, read_clips, read_video

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".gif", ".flv",
                    ".wmv", ".ts", ".3gp", ".ogv")
SHARD_VIDEO_EXTENSIONS = tuple(e[1:] for e in VIDEO_EXTENSIONS) + ("video",)
PATH_COLUMNS = ("path", "file", "video")
CAPTION_COLUMNS = ("caption", "text")
CLASS_COLUMNS = ("class_id", "label")
AUTO_CAPTIONS = "metadata.jsonl"


@dataclass
class VideoItem:
    """One input video: where its bytes are, plus its caption / class id / metadata."""
    key: str
    caption: str | None = None
    class_id: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None        # a video file (folder inputs)
    shard: Path | None = None       # a raw shard (shard inputs) ...
    member: str | None = None       # ... the member holding the video,
    offset: int = 0                 # ... where its data starts in the tar file
    size: int = 0                   # ... and its size in bytes

    @property
    def source(self) -> str:
        """Human-readable origin, for reports."""
        return str(self.path) if self.path is not None else f"{self.shard}:{self.member}"

    def readable(self) -> Path | bytes:
        """What the decoder reads: the video file's path, or the bytes of its shard member."""
        return self.path if self.path is not None else self.load_bytes()

    def load_bytes(self) -> bytes:
        """The encoded video; VideoError when the file is gone or the shard is cut short."""
        if self.path is not None:
            try:
                return self.path.read_bytes()
            except FileNotFoundError:
                raise VideoError(f"file not found: {self.path}") from None
        if self.shard is None:
            raise ValueError(f"item {self.key!r} has neither a path nor a shard")
        try:
            with open(self.shard, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except FileNotFoundError:
            raise VideoError(f"file not found: {self.shard}") from None
        if len(data) != self.size:
            raise VideoError(f"corrupt or truncated: shard {self.shard} ends inside {self.member} "
                             f"({len(data)} of {self.size} bytes)")
        return data


class ItemList(list):
    """A list of `VideoItem` with ``problems``: what was skipped or did not match, and why."""

    def __init__(self, items: Sequence[VideoItem] = (), problems: Sequence[str] = ()) -> None:
        super().__init__(items)
        self.problems: list[str] = list(problems)


def _report(problems: list[str], message: str) -> None:
    log.warning(message)
    problems.append(message)


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _is_pattern(text: str) -> bool:
    return "{" in text and "}" in text


def list_items(input: str | Path, captions: str | Path | None = None) -> ItemList:
    """List the videos of ``input`` (see module doc); sorted and deterministic."""
    text = str(input)
    if _is_pattern(text) and not Path(text).exists():
        from braceexpand import braceexpand

        shards = [Path(p) for p in braceexpand(text)]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {text!r} not found: {', '.join(missing[:5])}"
                                    + (" ..." if len(missing) > 5 else ""))
        _no_captions_for_shards(captions)
        return _list_shards(shards)
    root = Path(input)
    if not root.exists():
        raise FileNotFoundError(f"input not found: {root}")
    if root.is_file():
        if root.suffix.lower() == ".tar":
            _no_captions_for_shards(captions)
            return _list_shards([root])
        if root.suffix.lower() not in VIDEO_EXTENSIONS:
            raise ValueError(f"{root} is neither a video ({', '.join(VIDEO_EXTENSIONS)}) nor a .tar shard")
        return _list_folder(root.parent, [root], captions)
    files = sorted((p for p in root.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(root))),
                   key=lambda p: p.relative_to(root).as_posix())
    videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
    if videos:
        if captions is None and (root / AUTO_CAPTIONS).is_file():
            captions = root / AUTO_CAPTIONS
        return _list_folder(root, videos, captions)
    tars = [p for p in files if p.suffix.lower() == ".tar"]
    if tars:
        _no_captions_for_shards(captions)
        return _list_shards(tars)
    raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) and no .tar shards under {root}")


def _no_captions_for_shards(captions: str | Path | None) -> None:
    if captions is not None:
        raise ValueError("a captions file applies to a folder of videos; shards carry their own "
                         "captions (<key>.txt / .json / .cls members)")


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------
def _first(row: dict[str, Any], names: Sequence[str]) -> Any:
    for n in names:
        if n in row and row[n] not in (None, ""):
            return row[n]
    return None


def _read_rows(path: Path, problems: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a CSV (header required) or JSONL file, with 1-based line numbers."""
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not set(reader.fieldnames) & set(PATH_COLUMNS):
                raise ValueError(f"captions file {path} has no path column (one of {', '.join(PATH_COLUMNS)}); "
                                 f"header: {reader.fieldnames}")
            for row in reader:
                rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
        return rows
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                _report(problems, f"captions {path.name} line {n}: not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                _report(problems, f"captions {path.name} line {n}: not a JSON object")
                continue
            rows.append((n, row))
    if rows and not any(_first(r, PATH_COLUMNS) is not None for _, r in rows):
        raise ValueError(f"captions file {path} has no path column (one of {', '.join(PATH_COLUMNS)}) in any row")
    return rows


def _list_folder(root: Path, videos: list[Path], captions: str | Path | None) -> ItemList:
    problems: list[str] = []
    by_path = {p.resolve(): p for p in videos}
    rows: dict[Path, dict[str, Any]] = {}
    if captions is not None:
        cap = Path(captions)
        if not cap.is_file():
            raise FileNotFoundError(f"captions file not found: {cap}")
        for n, row in _read_rows(cap, problems):
            rel = _first(row, PATH_COLUMNS)
            if rel is None:
                _report(problems, f"captions {cap.name} line {n}: no path ({'/'.join(PATH_COLUMNS)})")
                continue
            candidates = [Path(rel)] if Path(rel).is_absolute() else [root / rel, cap.parent / rel]
            found = next((c.resolve() for c in candidates if c.resolve() in by_path), None)
            if found is None:
                _report(problems, f"captions {cap.name} line {n}: {rel!r} is not a video under {root}")
            elif found in rows:
                _report(problems, f"captions {cap.name} line {n}: second row for {rel!r} ignored")
            else:
                rows[found] = row
        missing = len(videos) - len(rows)
        if missing:
            _report(problems, f"{missing} of {len(videos)} videos have no row in {cap.name} (no caption/class)")
    labels = [_first(r, CLASS_COLUMNS) for r in rows.values()]
    names = _label_names([lab for lab in labels if lab is not None])
    items = ItemList(problems=problems)
    for p in videos:
        rel = p.relative_to(root).as_posix()
        row = rows.get(p.resolve(), {})
        label = _first(row, CLASS_COLUMNS)
        meta = dict(row, path=rel)
        if names is not None and label is not None:
            meta["label"] = str(label)
        caption_text = _first(row, CAPTION_COLUMNS)
        items.append(VideoItem(key=rel.rsplit(".", 1)[0], path=p, meta=meta,
                               caption=None if caption_text is None else str(caption_text),
                               class_id=None if label is None else (names[str(label)] if names else int(float(label)))))
    return items


def _label_names(labels: list[Any]) -> dict[str, int] | None:
    """None when every label is an integer; otherwise label name -> id in sorted name order."""
    try:
        for lab in labels:
            if isinstance(lab, bool) or float(lab) != int(float(lab)):
                raise ValueError
        return None
    except (TypeError, ValueError):
        return {name: i for i, name in enumerate(sorted({str(lab) for lab in labels}))}


# --------------------------------------------------------------------------------------------
# raw shards
# --------------------------------------------------------------------------------------------
def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's grouping rule: key = path up to the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _list_shards(shards: list[Path]) -> ItemList:
    items = ItemList()
    problems = items.problems
    seen: set[str] = set()
    for shard in shards:
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_member(m.name)
                    sample = samples.setdefault(key, {"videos": []})
                    if ext.rsplit(".", 1)[-1] in SHARD_VIDEO_EXTENSIONS:
                        sample["videos"].append(m)
                    elif ext in ("txt", "json", "cls"):
                        sample[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as e:
            _report(problems, f"shard {shard}: unreadable after {len(samples)} samples ({e})")
        for key in sorted(samples):
            item = _shard_item(shard, key, samples[key], problems)
            if item is None:
                continue
            if item.key in seen:
                item.key = f"{shard.stem}/{key}"
                _report(problems, f"shard {shard}: key {key!r} already seen in an earlier shard; renamed {item.key!r}")
            seen.add(item.key)
            items.append(item)
    return items


def _shard_item(shard: Path, key: str, sample: dict[str, Any], problems: list[str]) -> VideoItem | None:
    if not sample["videos"]:
        others = sorted(k for k in sample if k != "videos")
        _report(problems, f"shard {shard}: sample {key!r} has no video member (has: {', '.join(others) or 'nothing'})")
        return None
    video = sorted(sample["videos"], key=lambda m: m.name)[0]
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            loaded = json.loads(sample["json"])
            meta = loaded if isinstance(loaded, dict) else {"json": loaded}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            _report(problems, f"shard {shard}: sample {key!r} has an unreadable .json ({e})")
    caption = (sample["txt"].decode("utf-8", errors="replace").strip() if "txt" in sample
               else _first(meta, CAPTION_COLUMNS))
    raw_class = (sample["cls"].decode("utf-8", errors="replace").strip() if "cls" in sample
                 else _first(meta, CLASS_COLUMNS))
    class_id = None
    if raw_class is not None:
        try:
            class_id = int(raw_class)
        except (TypeError, ValueError):
            _report(problems, f"shard {shard}: sample {key!r} has a non-integer class {raw_class!r}; ignored")
    return VideoItem(key=key, caption=None if caption is None else str(caption), class_id=class_id, meta=meta,
                     shard=shard, member=video.name, offset=video.offset_data, size=video.size)


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------
class VideoClipDataset(Dataset):
    """Decoded clips of a list of `VideoItem`: ``dict(video=(C, T, H, W) in [-1, 1], key, caption,
    class_id)`` with ``caption=""`` and ``class_id=-1`` when absent. ``ds[i]`` is the first clip of
    video ``i``; `plan` + `read_windows` give several windows of one video (``ldm extract
    --clips-per-video``). A bad item raises `VideoError`; callers decide whether to skip it."""

    def __init__(self, items: Sequence[VideoItem], frames: int, height: int, width: int,
                 fps: float | None = None) -> None:
        self.items = list(items)
        self.frames, self.height, self.width, self.fps = frames, height, width, fps

    def __len__(self) -> int:
        return len(self.items)

    def _fields(self, index: int, video: torch.Tensor) -> dict[str, Any]:
        item = self.items[index]
        return dict(video=video, key=item.key, caption=item.caption or "",
                    class_id=-1 if item.class_id is None else item.class_id)

    def __getitem__(self, index: int) -> dict[str, Any]:
        video: torch.Tensor = read_video(self.items[index].readable(), self.frames, self.height, self.width, fps=self.fps)
        return self._fields(index, video)

    def plan(self, index: int, windows: Windows) -> list[Window]:
        """The windows item ``index`` gives as clips (see `data.video.Windows`); the first frames
        only need no look at the file. VideoError when the video is unreadable or too short."""
        if windows.first_only:
            return [Window(0, 0, 0.0)]
        return plan_windows(self.items[index].readable(), self.frames, self.fps, windows)

    def read_windows(self, index: int, windows: Sequence[Window]) -> list[dict[str, Any] | VideoError]:
        """The clips of item ``index`` at ``windows`` (from `plan`), decoded in one pass: a dict like
        ``self[index]`` per window, or the VideoError of a window the video cannot give. Raises
        VideoError when the video cannot be read at all. ``[Window(0, 0, 0.0)]`` gives exactly
        ``self[index]``'s clip."""
        clips = read_clips(self.items[index].readable(), self.frames, self.height, self.width, self.fps,
                           [w.start for w in windows])
        return [c if isinstance(c, VideoError) else self._fields(index, c) for c in clips]

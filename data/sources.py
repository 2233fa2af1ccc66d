"""Video inputs: a folder of videos (+ optional captions file) or raw WebDataset video shards.

``list_items(input, captions=None)`` returns a deterministic, sorted list of `VideoItem`:

- a folder (searched recursively, following symlinked folders; hidden files and folders skipped)
  of videos with a common extension (`VIDEO_EXTENSIONS`); keys are the relative paths without
  extension (with it when two videos share a path up to the extension, ``bikes.mp4`` and
  ``bikes.webm``), items sorted by relative path. A folder reached twice (a symlink loop, or two
  links to one folder) is listed once and the second way in is reported; so is a file reached
  twice (a symlink or hard link to a listed video: the file itself is kept);
- a single video file;
- raw WebDataset shards: a ``.tar`` file, a folder holding ``.tar`` files (and no videos), or a brace
  pattern such as ``"dir/shard-{000000..000003}.tar"``. Members are grouped into samples by
  WebDataset's rule (the key is the member path up to the first dot of its base name); a sample
  needs one video member (``mp4``, ``webm``, ... or ``video``) and may have ``txt`` (caption),
  ``json`` (metadata; ``caption``/``text`` and ``class_id``/``label`` are read from it when there
  is no ``txt``/``cls``) and ``cls`` (integer class). A ``.json`` class that is a name (Kinetics-style
  ``"label": "abseiling"``) is numbered in sorted name order from 0, or by a class list (``classes=``,
  as for folders). Items are sorted by (shard, key).

Captions file (folders only): CSV (``.csv``; comma, semicolon or tab, from its header line) or
TSV (``.tsv``) with a header, or JSONL (any other name), one row per video, with columns
``path | file | video`` (relative to the input folder, else to the captions file's folder, or
absolute; ``\\`` separators and names in another Unicode normalization, as Windows and macOS write
them, match too), ``caption | text`` and ``class_id | label``, matched in any case (``PATH,Caption``).
Non-integer labels (e.g. UCF-101 class names) are numbered in sorted order and kept as
``meta["label"]`` and as the class name (``item.class_name``, ``items.class_names``). Every column lands in
``item.meta`` under its lower-case name. The encoding is
found from a byte-order mark (UTF-8/16/32), NUL-byte patterns (UTF-16 without a mark), else UTF-8,
else Windows-1252 / Latin-1 (reported as a problem: check accented characters); a file that is none
of these is an error naming it. A folder holding ``metadata.jsonl`` (what ``ldm data synth``
writes) uses it when no captions file is given; so is the ``index.json`` of an ``ldm sample`` folder
(its prompts are the captions, its class ids the classes, and each video is listed once: the GIF
beside an MP4 it lists is its twin, left out). A video without a caption from a file takes the
text of a sidecar next to it, ``clip.txt`` for ``clip.mp4`` (as raw shards' ``<key>.txt``).

Class folders (folders only; ``classes=``): ``"folder"`` takes each video's class from the top-level
folder it lies in under the input (``UCF-101/ApplyEyeMakeup/v_..._g01_c01.avi``: ``ApplyEyeMakeup``; an
ImageNet / Kinetics-style tree), ids in sorted folder-name order from 0 (as torchvision's ImageFolder).
A class list file instead fixes the numbering (`read_class_list`): UCF-101's ``classInd.txt`` ("1
ApplyEyeMakeup"; numbered from 1) or a Kinetics-style list (one name a line, "0 abseiling", or a CSV of
``id,name`` under a header; numbered from 0). Ids are always 0-based: the file's first number is id 0,
so classInd's "1 ApplyEyeMakeup" is class id 0 and "101 YoYo" id 100. Folder names match the list's
names exactly, else ignoring case; a folder the list does not name, or a video outside any class
folder, is a `UserError`. The ids are given before a split is applied, so a train and a test split
number their classes alike.

A split list (folders only; ``split=``): one video a line, its path relative to the input folder
(UCF-101's ``trainlist01.txt`` / ``testlist01.txt``), optionally followed by a label number; only the listed
videos are kept (``items.left_out`` counts the others). A label must agree with the class list file's number
for the video's folder (``trainlist01``'s "ApplyEyeMakeup/v_..._g08_c01.avi 1" with classInd's "1
ApplyEyeMakeup"), else a `UserError`; labels that number the classes otherwise than ``"folder"``'s
sorted names (classInd.txt sorts ``JumpingJack`` before ``JumpRope``, Python the reverse) are a problem,
as is a listed path that is not a video under the folder.

Problems that should not stop a run (a captions row naming a missing file, a duplicate row, a
shard sample without a video, an unreadable shard, a broken symlink) are logged and collected in
``items.problems``: the returned `ItemList` is a plain list with that extra attribute. A missing
input or captions file (`MissingInput`), a captions file without a path column or in an unknown
encoding, or an input without videos is a `UserError`.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import tarfile
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from data.manifest import MANIFEST
from data.video import NamedBytes, VideoError, Window, Windows, plan_windows, read_clips_timed, read_video
from ldm.errors import MissingInput, UserError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".gif", ".flv",
                    ".wmv", ".ts", ".3gp", ".ogv",
                    # camcorders (AVCHD), DVDs, broadcast and older web formats, raw streams
                    ".mts", ".m2ts", ".m2v", ".vob", ".mxf", ".dv", ".f4v", ".3g2", ".asf", ".rm", ".rmvb", ".qt",
                    ".divx", ".nut", ".y4m", ".h264", ".264", ".hevc", ".265", ".mjpeg")
SHARD_VIDEO_EXTENSIONS = tuple(e[1:] for e in VIDEO_EXTENSIONS) + ("video",)
PATH_COLUMNS = ("path", "file", "video")
CAPTION_COLUMNS = ("caption", "text")
CLASS_COLUMNS = ("class_id", "label")
AUTO_CAPTIONS = "metadata.jsonl"
SAMPLE_INDEX = "index.json"  # what `ldm sample` writes beside its NNNN.mp4 + NNNN.gif
DELIMITED = (".csv", ".tsv", ".tab")  # captions files read as delimited text with a header; others as JSONL


@dataclass
class VideoItem:
    """One input video: where its bytes are, plus its caption / class id / metadata."""
    key: str
    caption: str | None = None
    class_id: int | None = None
    class_name: str | None = None   # the name of class_id: a class folder or a text label
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

    def load_bytes(self) -> NamedBytes:
        """The encoded video, named by `source` in the errors about it; VideoError when the file is
        gone or the shard is cut short."""
        if self.path is not None:
            try:
                return NamedBytes(self.path.read_bytes(), self.source)
            except FileNotFoundError:
                raise VideoError(f"file not found: {self.path}") from None
        if self.shard is None:
            raise ValueError(f"item {self.key!r} has neither a path nor a shard")
        try:
            with open(self.shard, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except FileNotFoundError:
            raise VideoError(f"file not found: {self.shard} (the shard holding {self.member})") from None
        if len(data) != self.size:
            raise VideoError(f"corrupt or truncated: shard {self.shard} ends inside {self.member} "
                             f"({len(data)} of {self.size} bytes)")
        return NamedBytes(data, self.source)


class ItemList(list):
    """A list of `VideoItem` with ``problems``: what was skipped or did not match, and why;
    ``class_names``: the name of each class id (index = id; empty when the ids are bare numbers);
    ``left_out``: videos of the input that a split list does not name."""

    def __init__(self, items: Sequence[VideoItem] = (), problems: Sequence[str] = (),
                 class_names: Sequence[str] = (), left_out: int = 0) -> None:
        super().__init__(items)
        self.problems: list[str] = list(problems)
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.left_out = left_out


def _report(problems: list[str], message: str) -> None:
    log.warning(message)
    problems.append(message)


def _is_pattern(text: str) -> bool:
    return "{" in text and "}" in text


FOLDER_CLASSES = "folder"  # ``classes=``: each video's class is its top-level folder


def list_items(input: str | Path, captions: str | Path | None = None, classes: str | Path | None = None,
               split: str | Path | None = None) -> ItemList:
    """List the videos of ``input`` (see module doc); sorted and deterministic. ``classes``:
    `FOLDER_CLASSES` or a class list file; ``split``: a list of the videos to keep."""
    text = str(input)
    if _is_pattern(text) and not Path(text).exists():
        from braceexpand import braceexpand

        shards = [Path(p) for p in braceexpand(text)]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise MissingInput(f"{len(missing)} shard(s) of {text!r} not found: {', '.join(missing[:5])}"
                                    + (" ..." if len(missing) > 5 else ""))
        _no_captions_for_shards(captions, split)
        return _list_shards(shards, classes)
    root = Path(input)
    if not root.exists():
        raise MissingInput(f"input not found: {root}" + (" (a broken symlink)" if root.is_symlink() else ""))
    if root.is_file():
        if root.suffix.lower() == ".tar":
            _no_captions_for_shards(captions, split)
            return _list_shards([root], classes)
        if root.suffix.lower() not in VIDEO_EXTENSIONS:
            raise UserError(f"{root} is neither a video ({', '.join(VIDEO_EXTENSIONS)}) nor a .tar shard")
        if classes is not None or split is not None:
            raise UserError(f"--classes / --split apply to a folder of videos, not to one file ({root})")
        return _list_folder(root.parent, [root], captions)
    problems: list[str] = []
    files = _walk(root, problems)
    videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
    if videos:
        index = _sample_index(root) if captions is None else None
        if index is not None:  # an `ldm sample` folder: each video once (its MP4), captioned by its prompt
            listed = {_same_name(root / e["file"]) for e in index} & {_same_name(p) for p in videos}
            videos = [p for p in videos
                      if not (p.suffix.lower() == ".gif" and _same_name(p.with_suffix(".mp4")) in listed)]
        elif captions is None and (root / AUTO_CAPTIONS).is_file():
            captions = root / AUTO_CAPTIONS
        items = _list_folder(root, videos, captions, index)
        items.problems[:0] = problems
        base = None
        if classes is not None:
            base = _folder_classes(root, items, classes)
        return items if split is None else _split(items, Path(split), root, base)
    tars = [p for p in files if p.suffix.lower() == ".tar"]
    if tars and ((root / MANIFEST).is_file() or any(root.glob("shard-*.json"))):
        raise UserError(f"{root} holds latent shards written by `ldm extract` ({MANIFEST}, shard-*.json), not videos: "
                        "give the videos (or raw video shards) they came from")
    if tars:
        _no_captions_for_shards(captions, split)
        items = _list_shards(tars, classes)
        items.problems[:0] = problems
        return items
    raise UserError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) and no .tar shards under {root}"
                    + (f" ({'; '.join(problems)})" if problems else ""))


def _walk(root: Path, problems: list[str]) -> list[Path]:
    """Every file under ``root`` that is not hidden, sorted by relative path, following symlinked
    folders. Each folder is entered once (identified by device and inode), so a symlink loop or a
    second link to a listed folder is reported instead of listed again; broken links are reported."""
    seen: set[tuple[int, int]] = set()
    files: list[Path] = []

    def unreadable(e: OSError) -> None:
        _report(problems, f"{e.filename}: cannot be listed ({e.strerror})")

    for folder, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(folder)
        st = here.stat()
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            _report(problems, f"{here.relative_to(root).as_posix()}: links to a folder already listed "
                              f"({here.resolve()}); skipped")
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = here / name
            if name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink():
                _report(problems, f"{path.relative_to(root).as_posix()}: broken symlink; skipped")
    return _once(sorted(files, key=lambda p: p.relative_to(root).as_posix()), root, problems)


def _once(files: list[Path], root: Path, problems: list[str]) -> list[Path]:
    """``files`` with each file once (by device and inode): a link to a file listed under another
    name is reported and left out, the file itself (not a symlink) kept where there is one."""
    by_id: dict[tuple[int, int], list[Path]] = {}
    for path in files:
        st = path.stat()
        by_id.setdefault((st.st_dev, st.st_ino), []).append(path)
    dropped: set[Path] = set()
    for same in by_id.values():
        kept = next((p for p in same if not p.is_symlink()), same[0])
        for path in same:
            if path is not kept:
                dropped.add(path)
                _report(problems, f"{path.relative_to(root).as_posix()}: the same file as "
                                  f"{kept.relative_to(root).as_posix()}; skipped")
    return [p for p in files if p not in dropped]


def _no_captions_for_shards(captions: str | Path | None, split: str | Path | None = None) -> None:
    if captions is not None:
        raise UserError("a captions file applies to a folder of videos; shards carry their own "
                         "captions (<key>.txt / .json / .cls members)")
    if split is not None:
        raise UserError("--split applies to a folder of videos; shards hold the videos of one split")


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------
def _caption(value: Any) -> str | None:
    """A caption as text without the spaces and line breaks around it; None when nothing is left."""
    return None if value is None else (str(value).strip() or None)


def _first(row: dict[str, Any], names: Sequence[str]) -> Any:
    for n in names:
        if n in row and row[n] not in (None, ""):
            return row[n]
    return None


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_text(path: Path, problems: list[str]) -> str:
    """The text of a captions file in whatever encoding it was saved (see the module doc); a
    `UserError` naming the file when it is no text at all."""
    data = path.read_bytes()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), None)
    if encoding is None and b"\x00" in data[:4096]:
        head = data[:4096]
        odd, even = head[1::2].count(0), head[0::2].count(0)  # ASCII in UTF-16: every other byte is NUL
        if max(odd, even) >= 0.3 * (len(head) // 2) and min(odd, even) == 0:
            encoding = "utf-16-le" if odd else "utf-16-be"
    try:
        text = data.decode(encoding or "utf-8")
    except UnicodeDecodeError as e:
        if encoding is not None:
            raise UserError(f"captions file {path}: not valid {encoding} ({e.reason} at byte {e.start}); "
                            "save it as UTF-8") from None
        for encoding in ("cp1252", "latin-1"):
            try:
                text = data.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
        _report(problems, f"captions {path.name}: not UTF-8; read as {encoding} (check accented characters, or "
                          "save it as UTF-8)")
    if any(c in text for c in "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0e\x0f"):
        raise UserError(f"captions file {path}: binary content, not a text file (CSV/TSV with a header, or JSONL); "
                        "save it as UTF-8 text")
    return text


def _delimiter(path: Path, header: str) -> str:
    """Tab for .tsv / .tab; for .csv the most frequent of comma, semicolon and tab in the header."""
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _lower_keys(row: dict[Any, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in row.items() if k is not None}


def _read_rows(path: Path, problems: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a CSV/TSV (header required) or JSONL file, with 1-based line numbers; column names
    lower-cased."""
    rows: list[tuple[int, dict[str, Any]]] = []
    text = read_text(path, problems)
    if path.suffix.lower() in DELIMITED:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text.split("\n", 1)[0]))
        try:
            fields = [str(f).strip().lower() for f in reader.fieldnames or []]
            if not set(fields) & set(PATH_COLUMNS):
                raise UserError(f"captions file {path} has no path column (one of {', '.join(PATH_COLUMNS)}, any "
                                f"case); header: {reader.fieldnames}")
            reader.fieldnames = fields
            for row in reader:
                rows.append((reader.line_num, _lower_keys(row)))
        except csv.Error as e:
            raise UserError(f"captions file {path} line {reader.line_num}: {e}") from None
        return rows
    lines = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        lines += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _report(problems, f"captions {path.name} line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            _report(problems, f"captions {path.name} line {n}: not a JSON object")
            continue
        rows.append((n, _lower_keys(row)))
    if rows and not any(_first(r, PATH_COLUMNS) is not None for _, r in rows):
        raise UserError(f"captions file {path} has no path column (one of {', '.join(PATH_COLUMNS)}) in any row")
    if lines and not rows:
        raise UserError(f"captions file {path}: no line is a JSON object (read as JSONL; a CSV or TSV file needs a "
                        ".csv or .tsv name)")
    return rows


def _same_name(path: Path) -> str:
    """``path`` resolved, in Unicode NFC: a name typed in a captions file matches a file named on a
    Mac (NFD: "u" + combining diaeresis for "ü")."""
    return unicodedata.normalize("NFC", str(path.resolve()))


def _sample_index(root: Path) -> list[dict[str, Any]] | None:
    """The entries of the ``index.json`` that `ldm sample` writes into its folder (``file``, ``prompt``,
    ``class_id``, ``seed``, ...), None when ``root`` has none, or another kind of ``index.json``."""
    try:
        entries = json.loads((root / SAMPLE_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                                for e in entries):
        return None
    return entries


def _list_folder(root: Path, videos: list[Path], captions: str | Path | None,
                 index: list[dict[str, Any]] | None = None) -> ItemList:
    """The items of ``videos`` under ``root``, with the rows of a ``captions`` file or of an ``ldm
    sample`` ``index`` (its prompts as captions, its class ids)."""
    problems: list[str] = []
    by_path = {_same_name(p): p.resolve() for p in videos}
    rows: dict[Path, dict[str, Any]] = {}
    if captions is not None or index is not None:
        cap = Path(captions) if captions is not None else root / SAMPLE_INDEX
        if not cap.is_file():
            raise MissingInput(f"captions file not found: {cap}")
        lines = _read_rows(cap, problems) if index is None else enumerate(
            ({**e, "caption": e.get("prompt")} for e in index), 1)
        for n, row in lines:
            rel = _first(row, PATH_COLUMNS)
            if rel is None:
                _report(problems, f"captions {cap.name} line {n}: no path ({'/'.join(PATH_COLUMNS)})")
                continue
            rel = str(rel).replace("\\", "/")  # a path written on Windows
            candidates = [Path(rel)] if Path(rel).is_absolute() else [root / rel, cap.parent / rel]
            found = next((by_path[_same_name(c)] for c in candidates if _same_name(c) in by_path), None)
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
    items = ItemList(problems=problems, class_names=list(names or ()))
    rels = [p.relative_to(root).as_posix() for p in videos]
    for p, rel, key in zip(videos, rels, video_keys(rels)):
        row = rows.get(p.resolve(), {})
        label = _first(row, CLASS_COLUMNS)
        meta = dict(row, path=rel)
        if names is not None and label is not None:
            meta["label"] = str(label)
        caption_text = _caption(_first(row, CAPTION_COLUMNS))
        if caption_text is None and p.with_suffix(".txt").is_file():  # a sidecar: clip.mp4 + clip.txt
            caption_text = _caption(read_text(p.with_suffix(".txt"), items.problems))
        items.append(VideoItem(key=key, path=p, meta=meta, caption=caption_text,
                               class_name=str(label) if names is not None and label is not None else None,
                               class_id=None if label is None else (names[str(label)] if names else int(float(label)))))
    return items


def video_keys(rels: Sequence[str]) -> list[str]:
    """The key of each video from its relative path: the path without its extension, unless
    another video has the same one (``bikes.mp4`` and ``bikes.webm``): then the whole path."""
    stems = [r.rsplit(".", 1)[0] for r in rels]
    counts: dict[str, int] = {}
    for k in stems:
        counts[k] = counts.get(k, 0) + 1
    keys = [r if counts[k] > 1 else k for r, k in zip(rels, stems)]
    taken = set(rels)  # a kept extension may meet another video's stem ("a.mp4" vs "a.mp4.mkv")
    return [r if k != r and k in taken else k for r, k in zip(rels, keys)]


def class_index(names: Sequence[str], name: str) -> int | None:
    """The id of class ``name`` in ``names`` (index = id): the exact name, else the one name that
    matches ignoring case (UCF-101 lists ``HandstandPushups``, its files say ``HandStandPushups``);
    None when there is none."""
    if name in names:
        return list(names).index(name)
    folded = [i for i, n in enumerate(names) if n.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def read_class_list(path: str | Path) -> tuple[tuple[str, ...], int]:
    """The class names of a class list file by id, and the number the file gives id 0: ``"N name"``
    lines numbered from 1 (UCF-101's ``classInd.txt``) or from 0 without gaps, or one name a line
    (numbered from 0 in line order); a ``.csv`` / ``.tsv`` file holds ``id,name`` or ``name`` rows
    (Kinetics label lists) under a header line, as a captions file. A header line before numbered
    lines (``id,name``) is skipped. A `UserError` naming the file and line when it is none of these."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"--classes {path}: class list file not found (or give 'folder': sorted folder names)")
    text = read_text(path, [])
    if path.suffix.lower() in DELIMITED:  # (number, name) or (name, ...) columns
        rows = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text.split("\n", 1)[0]))
        lines = [(n, [c.strip() for c in row]) for n, row in enumerate(rows, 1) if any(c.strip() for c in row)]
        lines = [(n, row[:2] if row[0].isdigit() else row[:1]) for n, row in lines]
        if lines and len(lines[0][1]) == 1:  # its header line ("name"), as a captions file has
            lines = lines[1:]
    else:  # "number name" (the name may hold spaces) or the whole line
        lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        lines = [(n, line.split(None, 1) if line.split(None, 1)[0].isdigit() else [line]) for n, line in lines]
    if len(lines) > 1 and len(lines[0][1]) != 2 and all(len(parts) == 2 for _, parts in lines[1:]):
        lines = lines[1:]  # a header: "id,name", "index name"
    if not lines:
        raise UserError(f"--classes {path}: no class names in the file")
    if all(len(parts) == 2 for _, parts in lines):
        numbers = [int(parts[0]) for _, parts in lines]
        base = min(numbers)
        if base not in (0, 1) or sorted(numbers) != list(range(base, base + len(numbers))):
            raise UserError(f"--classes {path}: the class numbers must run from 1 (classInd.txt) or from 0 to the "
                            f"number of classes without gaps or repeats; got {base} to {max(numbers)} for "
                            f"{len(numbers)} lines")
        names = tuple(parts[1].strip() for _, parts in sorted(lines, key=lambda x: int(x[1][0])))
    elif any(len(parts) == 2 for _, parts in lines):
        n = next(n for n, parts in lines if len(parts) != 2)
        raise UserError(f"--classes {path} line {n}: some lines are 'NUMBER NAME' and this one is not; number "
                        "every line or none")
    else:
        base, names = 0, tuple(parts[0] for _, parts in lines)
    repeated = sorted({x for x in names if names.count(x) > 1})
    if repeated:
        raise UserError(f"--classes {path}: class {repeated[0]!r} is named twice")
    return names, base


def _folder_classes(root: Path, items: ItemList, classes: str | Path) -> int | None:
    """Set each item's class from its top-level folder (see the module doc); returns the number a
    class list file gives id 0 (None with `FOLDER_CLASSES`)."""
    labelled = next((it for it in items if it.class_id is not None), None)
    if labelled is not None:
        raise UserError(f"--classes {classes}: {labelled.key} already has a class id from its captions file (class_id "
                        "/ label column); give one source of class ids")
    folders = [it.meta["path"].split("/", 1)[0] if "/" in it.meta["path"] else None for it in items]
    loose = [it.meta["path"] for it, f in zip(items, folders) if f is None]
    if loose:
        raise UserError(f"--classes {classes}: {len(loose)} video(s) of {root} lie outside any class folder (first: "
                        f"{loose[0]}); put each video in its class's folder, or give --input the folder above them")
    base = None
    if str(classes) == FOLDER_CLASSES:
        names = tuple(sorted(set(folders)))  # type: ignore[arg-type]
    else:
        names, base = read_class_list(classes)
    ids = {f: class_index(names, f) for f in set(folders)}  # type: ignore[arg-type]
    unknown = sorted(f for f, i in ids.items() if i is None)
    if unknown:
        raise UserError(f"--classes {classes}: folder(s) {', '.join(unknown[:3])}{' ...' * (len(unknown) > 3)} of "
                        f"{root} name no class of the list ({len(names)} classes); leave them out with --split, or "
                        "fix the list")
    for it, f in zip(items, folders):
        it.class_id = ids[f]
        it.class_name = names[it.class_id]  # type: ignore[index]
    items.class_names = names
    return base


def _split(items: ItemList, split: Path, root: Path, base: int | None) -> ItemList:
    """The items a split list names (see the module doc), in the input's order."""
    if not split.is_file():
        raise MissingInput(f"--split {split}: split list file not found")
    by_path: dict[str, VideoItem] = {}
    for it in items:
        by_path[it.meta["path"]] = by_path[it.key] = it
    folded: dict[str, list[VideoItem]] = {}
    for it in items:
        folded.setdefault(unicodedata.normalize("NFC", it.meta["path"]).casefold(), []).append(it)
    chosen: set[int] = set()
    labelled: list[tuple[VideoItem, int]] = []
    for n, line in enumerate(read_text(split, items.problems).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        label = int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else None
        rel = (parts[0] if label is not None else line).replace("\\", "/").removeprefix("./")
        same = folded.get(unicodedata.normalize("NFC", rel).casefold(), [])
        it = by_path.get(rel) or (same[0] if len(same) == 1 else None)
        if it is None:
            _report(items.problems, f"split {split.name} line {n}: {rel!r} is not a video under {root}")
            continue
        if id(it) in chosen:
            _report(items.problems, f"split {split.name} line {n}: {rel!r} is listed twice")
            continue
        if label is not None and base is not None and label - base != it.class_id:
            raise UserError(f"--split {split} line {n}: {rel} has label {label}, but the class list numbers its "
                            f"folder's class {it.class_name!r} {it.class_id + base}; give the class list "
                            "that goes with this split")
        chosen.add(id(it))
        if label is not None:
            labelled.append((it, label))
    if base is None and labelled and labelled[0][0].class_id is not None:  # --classes folder: sorted folder names
        first = 0 if min(label for _, label in labelled) == 0 else 1
        differ = {it.class_name: (label, it.class_id) for it, label in labelled if label - first != it.class_id}
        if differ:
            name, (label, got) = next(iter(differ.items()))
            _report(items.problems, f"split {split.name}: its labels number {len(differ)} class(es) otherwise than "
                                    f"--classes folder (sorted folder names), e.g. {name!r}: {label} in the list "
                                    f"(id {label - first}), id {got} here; for the list's numbering give its class "
                                    "list (UCF-101: classInd.txt) as --classes")
    kept = [it for it in items if id(it) in chosen]
    if not kept:
        raise UserError(f"--split {split}: none of its lines names a video under {root} (paths relative to it, "
                        f"e.g. {items[0].meta['path']})")
    return ItemList(kept, items.problems, items.class_names, left_out=len(items) - len(kept))


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


def _list_shards(shards: list[Path], classes: str | Path | None = None) -> ItemList:
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
                    sample = samples.setdefault(key, {"videos": [], "members": []})
                    sample["members"].append(ext)
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
    _shard_classes(items, classes)
    return items


def _shard_item(shard: Path, key: str, sample: dict[str, Any], problems: list[str]) -> VideoItem | None:
    if not sample["videos"]:
        _report(problems, f"shard {shard}: sample {key!r} has no video member (has: "
                          f"{', '.join(sorted(sample['members'])) or 'nothing'})")
        return None
    video = sorted(sample["videos"], key=lambda m: m.name)[0]
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            loaded = json.loads(sample["json"])
            meta = loaded if isinstance(loaded, dict) else {"json": loaded}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            _report(problems, f"shard {shard}: sample {key!r} has an unreadable .json ({e})")
    caption = _caption(sample["txt"].decode("utf-8", errors="replace") if "txt" in sample
                       else _first(meta, CAPTION_COLUMNS))
    raw_class = (sample["cls"].decode("utf-8", errors="replace").strip() if "cls" in sample
                 else _first(meta, CLASS_COLUMNS))
    class_id, class_name = None, None
    if raw_class is not None:
        try:
            class_id = int(raw_class)
        except (TypeError, ValueError):
            if "cls" in sample or isinstance(raw_class, (bool, float, list, dict)) or not str(raw_class).strip():
                _report(problems, f"shard {shard}: sample {key!r} has a non-integer class {raw_class!r}; ignored")
            else:  # a class name in the .json ("label": "abseiling"): numbered by `_shard_classes`
                class_name = str(raw_class).strip()
    return VideoItem(key=key, caption=caption, class_id=class_id, class_name=class_name, meta=meta,
                     shard=shard, member=video.name, offset=video.offset_data, size=video.size)


def _shard_classes(items: ItemList, classes: str | Path | None) -> None:
    """Number the class names of shard samples (a .json ``label`` / ``class_id`` that is a name): by
    the class list ``classes`` (ids as `read_class_list`), else in sorted name order from 0. Integer
    ids stay as they are beside a list; without one, names and integer ids in one set are a `UserError`."""
    named = [it for it in items if it.class_name is not None]
    if classes is None and not named:
        return
    if str(classes) == FOLDER_CLASSES:
        raise UserError("--classes folder applies to a folder of videos; for shards give a class list file that "
                        "numbers the names of their .json labels (or no --classes)")
    if classes is None:
        numbered = next((it for it in items if it.class_id is not None), None)
        if numbered is not None:
            raise UserError(f"the shards give class names ({named[0].key}: {named[0].class_name!r}) and integer ids "
                            f"({numbered.key}: {numbered.class_id}); give --classes LIST to number the names")
        names = tuple(sorted({it.class_name for it in named}))  # type: ignore[type-var]
    else:
        names, _ = read_class_list(classes)
    unknown = sorted({it.class_name for it in named if class_index(names, it.class_name) is None})  # type: ignore
    if unknown:
        raise UserError(f"--classes {classes}: class(es) {', '.join(map(repr, unknown[:3]))}"
                        f"{' ...' * (len(unknown) > 3)} of the shards are not in the list ({len(names)} classes)")
    for it in named:
        it.class_id = class_index(names, it.class_name)  # type: ignore[arg-type]
        it.class_name = names[it.class_id]  # type: ignore[index]
    items.class_names = names


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
        return self.read(index, self.frames, self.height, self.width)

    def read(self, index: int, frames: int, height: int, width: int, uint8: bool = False) -> dict[str, Any]:
        """``self[index]`` at another length and size (``ldm train-ae`` shape buckets,
        `data.buckets`): the first ``frames`` frames at ``height x width`` (``uint8``: the clip's
        uint8 pixels, `data.video.read_video`)."""
        video: torch.Tensor = read_video(self.items[index].readable(), frames, height, width, fps=self.fps,
                                         uint8=uint8)
        return self._fields(index, video)

    def plan(self, index: int, windows: Windows) -> list[Window]:
        """The windows item ``index`` gives as clips (see `data.video.Windows`); the first frames
        only need no look at the file. VideoError when the video is unreadable or too short."""
        if windows.first_only:
            return [Window(0, 0, 0.0)]
        return plan_windows(self.items[index].readable(), self.frames, self.fps, windows)

    def read_windows(self, index: int, windows: Sequence[Window], uint8: bool = False
                     ) -> list[dict[str, Any] | VideoError]:
        """The clips of item ``index`` at ``windows`` (from `plan`), decoded in one pass: a dict like
        ``self[index]`` per window, or the VideoError of a window the video cannot give. Raises
        VideoError when the video cannot be read at all. ``[Window(0, 0, 0.0)]`` gives exactly
        ``self[index]``'s clip; each dict also has the video's ``source_fps`` and ``variable_rate``
        (`data.video.frame_timing`, from the same opening of the video: `data.video.read_clips_timed`).
        ``uint8=True`` (``ldm extract``): each clip comes as its uint8 pixels (`read_clips_timed`)."""
        src = self.items[index].readable()
        clips, (source_fps, variable) = read_clips_timed(src, self.frames, self.height, self.width, self.fps,
                                                         [w.start for w in windows], uint8=uint8)
        return [c if isinstance(c, VideoError) else
                {**self._fields(index, c), "source_fps": source_fps, "variable_rate": variable} for c in clips]

"""Class-conditional data the standard way (UCF-101, ImageNet / Kinetics-style class folders): the
class of a video from its folder with the official numbering (classInd.txt, 1-based in the file,
0-based ids) and split lists, the class names kept from extraction to `ldm sample --class NAME`,
per-class counts in `ldm data list`, and the class protocol of FVD in `ldm eval gen`."""
import dataclasses
import io
import json
import tarfile
from collections import Counter

import av
import numpy as np
import pytest
import torch

import autoencoders
import dit
from data.manifest import load_manifest, load_manifests
from data.sources import list_items, read_class_list
from launch.cli import main as ldm
from launch.data_cmd import print_classes
from launch.sample import class_ids_of, row_label, write_grid
from ldm import config as cfglib
from ldm.artifacts import AERecord, ClipSpec
from ldm.errors import UserError

CLASSES = ["ApplyEyeMakeup", "Basketball", "HandstandPushups"]


def _avi(path, shade: int, frames: int = 8) -> None:
    """A tiny MPEG-4 .avi (as UCF-101 ships), 32x32."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for t in range(frames):
            img = np.full((32, 32, 3), shade, np.uint8)
            img[t:t + 8, 4:12] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """UCF-101's layout: UCF-101/<Class>/v_<Class>_gXX_c01.avi (the files of HandstandPushups say
    HandStand, as in the real set) and ucfTrainTestlist/ with Windows line ends; groups 8-9 train."""
    root = tmp_path_factory.mktemp("ucf")
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    train, test = [], []
    for i, c in enumerate(CLASSES):
        (root / "UCF-101" / c).mkdir(parents=True)
        for g in (1, 8, 9):
            name = f"v_{c.replace('Handstand', 'HandStand')}_g{g:02d}_c01.avi"
            _avi(root / "UCF-101" / c / name, 40 + 60 * i + g)
            (train if g >= 8 else test).append(f"{c}/{name}" + (f" {i + 1}" if g >= 8 else ""))
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(CLASSES)), newline="")
    (lists / "trainlist01.txt").write_text("".join(f"{x}\r\n" for x in train), newline="")
    (lists / "testlist01.txt").write_text("".join(f"{x}\r\n" for x in test), newline="")
    return root


def test_class_folders_with_the_official_numbering_and_splits(ucf):
    lists = ucf / "ucfTrainTestlist"
    train = list_items(ucf / "UCF-101", classes=lists / "classInd.txt", split=lists / "trainlist01.txt")
    assert [(it.class_id, it.class_name) for it in train] == [(i, c) for i, c in enumerate(CLASSES) for _ in (8, 9)]
    assert train.class_names == tuple(CLASSES) and train.left_out == 3 and not train.problems
    test = list_items(ucf / "UCF-101", classes=lists / "classInd.txt", split=lists / "testlist01.txt")
    assert [it.key.split("/")[0] for it in test] == CLASSES and [it.class_id for it in test] == [0, 1, 2]
    # was: no class at all (class ids came only from a captions file's column)
    assert all(it.class_id is None for it in list_items(ucf / "UCF-101"))
    by_folder = list_items(ucf / "UCF-101", classes="folder")  # sorted folder names, from 0
    assert len(by_folder) == 9 and by_folder.class_names == tuple(CLASSES) and by_folder[-1].class_id == 2
    # a class list in another numbering: ids follow the list, not the folders' order; 0-based name lists
    (ucf / "names.txt").write_text("HandstandPushups\nBasketball\nApplyEyeMakeup\nYoYo\nplaying guitar\n")
    assert read_class_list(ucf / "names.txt") == (("HandstandPushups", "Basketball", "ApplyEyeMakeup", "YoYo",
                                                   "playing guitar"), 0)
    (ucf / "labels.csv").write_text('id,name\n1,"air drumming"\n0,abseiling\n')  # Kinetics-style, a header
    assert read_class_list(ucf / "labels.csv") == (("abseiling", "air drumming"), 0)
    items = list_items(ucf / "UCF-101", classes=ucf / "names.txt")
    assert [it.class_id for it in items][::3] == [2, 1, 0] and items.class_names[3] == "YoYo"


def test_class_list_and_split_mistakes_are_one_line(ucf, tmp_path):
    lists, videos = ucf / "ucfTrainTestlist", ucf / "UCF-101"
    (tmp_path / "shifted.txt").write_text("2 ApplyEyeMakeup\n3 Basketball\n4 HandstandPushups\n")
    (tmp_path / "two.txt").write_text("1 ApplyEyeMakeup\n2 Basketball\n")
    (tmp_path / "mixed.txt").write_text("1 ApplyEyeMakeup\nBasketball\n")
    (tmp_path / "swapped.txt").write_text("1 Basketball\n2 ApplyEyeMakeup\n3 HandstandPushups\n")
    cases = [(dict(classes=tmp_path / "shifted.txt"), "must run from 1 .classInd.txt. or from 0"),
             (dict(classes=tmp_path / "two.txt"), "folder.s. HandstandPushups of .* name no class of the list"),
             (dict(classes=tmp_path / "mixed.txt"), "mixed.txt line 2: some lines are 'NUMBER NAME'"),
             (dict(classes=tmp_path / "swapped.txt", split=lists / "trainlist01.txt"),
              "trainlist01.txt line 1: ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi has label 1, but the class list "
              "numbers its folder's class 'ApplyEyeMakeup' 2"),
             (dict(classes=tmp_path / "nope.txt"), "class list file not found"),
             (dict(split=tmp_path / "two.txt"), "none of its lines names a video")]
    for kw, message in cases:
        with pytest.raises(UserError, match=message):
            list_items(videos, **kw)
    (tmp_path / "renumbered.txt").write_text("Basketball/v_Basketball_g08_c01.avi 1\n"
                                             "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 2\n")
    listed = list_items(videos, classes="folder", split=tmp_path / "renumbered.txt")  # the list is not the folders'
    assert [it.class_id for it in listed] == [0, 1] and listed.problems == [
        "split renumbered.txt: its labels number 2 class(es) otherwise than --classes folder (sorted folder names), "
        "e.g. 'Basketball': 1 in the list (id 0), id 1 here; for the list's numbering give its class list (UCF-101: "
        "classInd.txt) as --classes"]
    assert not list_items(videos, classes="folder", split=lists / "trainlist01.txt").problems
    loose = tmp_path / "loose"
    (loose / "Basketball").mkdir(parents=True)
    (loose / "clip.avi").write_bytes((videos / CLASSES[0] / "v_ApplyEyeMakeup_g01_c01.avi").read_bytes())
    (loose / "Basketball" / "b.avi").write_bytes((videos / CLASSES[0] / "v_ApplyEyeMakeup_g01_c01.avi").read_bytes())
    with pytest.raises(UserError, match="1 video.s. of .* lie outside any class folder .first: clip.avi."):
        list_items(loose, classes="folder")
    (loose / "captions.csv").write_text("path,label\nBasketball/b.avi,dunk\n")
    with pytest.raises(UserError, match="already has a class id from its captions file"):
        list_items(loose, loose / "captions.csv", classes="folder")
    assert list_items(loose, loose / "captions.csv")[0].class_name == "dunk"  # a text label keeps its name
    with pytest.raises(UserError, match="--classes / --split apply to a folder of videos"):
        list_items(loose / "clip.avi", classes="folder")


def test_extract_keeps_class_names_and_counts_for_data_list(ucf, tmp_path, capsys):
    lists = ucf / "ucfTrainTestlist"
    common = ["--autoencoder", "kl2d-f8c4-debug", "--frames", "8", "--height", "32", "--width", "32"]
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["extract", "--input", str(ucf / "UCF-101"), "--classes", str(lists / "classInd.txt"), "--split",
             str(lists / "trainlist01.txt"), "--output", str(tmp_path / "train"), *common])
        ldm(["extract", "--input", str(ucf / "UCF-101"), "--classes", "folder", "--split",
             str(lists / "testlist01.txt"), "--output", str(tmp_path / "test"), *common])
    m = load_manifest(tmp_path / "train")  # was: num_classes only, no names
    assert (m.num_classes, m.class_names, m.class_counts, m.counts.written) == (3, tuple(CLASSES), (2, 2, 2), 6)
    merged = load_manifests(f"{tmp_path / 'train'},{tmp_path / 'test'}")
    assert merged.class_names == tuple(CLASSES) and merged.class_counts == (3, 3, 3)
    capsys.readouterr()
    ldm(["data", "list", "--input", str(ucf / "UCF-101"), "--classes", str(lists / "classInd.txt"), "--split",
         str(lists / "testlist01.txt")])
    shown = capsys.readouterr().out
    assert "3 videos in" in shown and "(6 others left out)" in shown and "    2 HandstandPushups: 1\n" in shown
    assert "class=1 (Basketball)" in shown
    ldm(["data", "list", "--input", str(ucf / "UCF-101")])
    assert "the videos lie in 3 folders (ApplyEyeMakeup, Basketball, HandstandPushups): if each is a class, " \
        "--classes folder" in capsys.readouterr().out
    ldm(["data", "list", "--input", str(tmp_path / "train")])
    shown = capsys.readouterr().out
    assert "per class (3 of 3 classes have clips; fewest 2, most 2)" in shown and "    0 ApplyEyeMakeup: 2\n" in shown
    many = tmp_path / "many"  # more classes than shown by default: a larger --show shows them all
    for i in range(21):
        (many / f"c{i:02d}").mkdir(parents=True)
        (many / f"c{i:02d}" / "a.avi").write_bytes((ucf / "UCF-101" / CLASSES[0] / "v_ApplyEyeMakeup_g01_c01.avi")
                                                   .read_bytes())
    ldm(["data", "list", "--input", str(many), "--classes", "folder", "--show", "0"])
    assert "    ... 1 more classes\n" in capsys.readouterr().out
    ldm(["data", "list", "--input", str(many), "--classes", "folder", "--show", "21"])
    assert "    20 c20: 1\n" in capsys.readouterr().out
    print_classes(Counter({0: 5, 2: 1}), ("a", "b", "c", "d"), "clips", show=1)
    assert capsys.readouterr().out == ("  per class (2 of 4 classes have clips; fewest 1, most 5):\n    0 a: 5\n"
                                       "    ... 1 more classes\n    without clips: 1 b, 3 d\n")
    side = tmp_path / "other"
    side.mkdir()
    (side / "names.txt").write_text("Basketball\nApplyEyeMakeup\nHandstandPushups\n")
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["extract", "--input", str(ucf / "UCF-101"), "--classes", str(side / "names.txt"), "--split",
             str(lists / "testlist01.txt"), "--output", str(side / "lat"), *common])
    with pytest.raises(ValueError, match="names its classes differently .* .class id 0: 'Basketball' vs "
                                         "'ApplyEyeMakeup'.: one id would mean two classes"):
        load_manifests(f"{tmp_path / 'train'},{side / 'lat'}")


def test_kinetics_style_shards_with_label_names(ucf, tmp_path):
    video = (ucf / "UCF-101" / CLASSES[0] / "v_ApplyEyeMakeup_g01_c01.avi").read_bytes()

    def shard(path, labels):
        with tarfile.open(path, "w") as tar:
            for i, label in enumerate(labels):
                for name, data in ((f"{i:04d}.avi", video), (f"{i:04d}.json", json.dumps({"label": label}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    shard(tmp_path / "k.tar", ["playing guitar", "abseiling", "playing guitar"])
    items = list_items(tmp_path / "k.tar")  # was: "non-integer class 'abseiling'; ignored" for every sample
    assert [(it.class_id, it.class_name) for it in items] == [(1, "playing guitar"), (0, "abseiling"),
                                                              (1, "playing guitar")]
    assert items.class_names == ("abseiling", "playing guitar") and not items.problems
    (tmp_path / "k400.txt").write_text("abseiling\nair drumming\nplaying guitar\n")
    assert [it.class_id for it in list_items(tmp_path / "k.tar", classes=tmp_path / "k400.txt")] == [2, 0, 2]
    (tmp_path / "two.txt").write_text("abseiling\nair drumming\n")
    with pytest.raises(UserError, match="class.es. 'playing guitar' of the shards are not in the list"):
        list_items(tmp_path / "k.tar", classes=tmp_path / "two.txt")
    with pytest.raises(UserError, match="--classes folder applies to a folder of videos"):
        list_items(tmp_path / "k.tar", classes="folder")
    shard(tmp_path / "mixed.tar", ["abseiling", 3])
    with pytest.raises(UserError, match="the shards give class names .* and integer ids .*; give --classes LIST"):
        list_items(tmp_path / "mixed.tar")


@pytest.fixture(scope="module")
def named_dit(tmp_path_factory):
    """A class-only DiT export (RANDOM weights) that knows the class names of its training data."""
    d = tmp_path_factory.mktemp("dit")
    cls, config = autoencoders.REGISTRY["kl2d-f8c4-debug"]
    spec = cls(config).latent_spec(8, 32, 32)
    dcfg = dit.make_config("dit-debug", spec, num_classes=3)
    torch.manual_seed(0)
    context = dit.Export(autoencoder=AERecord(name="kl2d-f8c4-debug", family="kl2d", config=cfglib.to_dict(config)),
                         video=ClipSpec(8, 32, 32), latent_spec=spec.to_dict(), form="grid", num_classes=3,
                         class_names=tuple(CLASSES))
    dit.save_export(d / "export", dit.VideoDiT(dcfg).state_dict(), dcfg, context)
    return d


def test_sample_by_class_name(named_dit, tmp_path):
    assert class_ids_of(["handstandpushups", "1", "ApplyEyeMakeup"], CLASSES, 3) == [2, 1, 0]
    with pytest.raises(UserError, match="--class 'ApplyMakeup' is not one of this DiT's 3 classes; did you mean "
                                        "ApplyEyeMakeup"):
        class_ids_of(["ApplyMakeup"], CLASSES, 3)
    with pytest.raises(UserError, match="this DiT's class ids have no names .* give an id, 0 to 2"):
        class_ids_of(["Basketball"], (), 3)
    with pytest.warns(UserWarning, match="RANDOM"):  # was: argparse "invalid int value: 'Basketball'"
        ldm(["sample", "--checkpoint", str(named_dit), "--class", "Basketball", "--class", "0", "--steps", "1",
             "--output", str(tmp_path / "s"), "--device", "cpu"])
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert [(e["class_id"], e["class_name"]) for e in index] == [(1, "Basketball"), (0, "ApplyEyeMakeup")]
    assert [row_label(e) for e in index] == ["Basketball", "ApplyEyeMakeup"]
    long = {"class_id": 4, "prompt": "a very long prompt about a red circle"}
    assert row_label(long) == "class 4 | a very long pro..."
    videos = torch.zeros(2, 3, 4, 8, 8)
    write_grid(videos, tmp_path / "plain.png")
    write_grid(videos, tmp_path / "named.png", ["Basketball", None])
    from PIL import Image
    plain, named = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "named.png")
    assert named.height == plain.height and named.width > plain.width + 40  # a label column left of the frames
    assert np.asarray(named)[:8, :40].min() < 128  # ... with dark text on white


def test_eval_gen_draws_classes_as_told_and_says_so(ucf, named_dit, tmp_path):
    from test_evaluate import TinyI3D

    from launch import evaluate as ev

    torch.jit.save(torch.jit.script(TinyI3D()), str(tmp_path / "i3d_torchscript.pt"))
    lists = ucf / "ucfTrainTestlist"
    sub = tmp_path / "sub"  # a reference with two of the three classes: sorted folder ids would be 0, 1
    for c in CLASSES[1:]:
        (sub / c).mkdir(parents=True)
        for v in (ucf / "UCF-101" / c).glob("*.avi"):
            (sub / c / v.name).write_bytes(v.read_bytes())

    export = dit.load_export(named_dit)[1]
    picked = [ev.reference_items(str(ucf / "UCF-101"), export, num=3, seed=0, classes="folder")[0] for _ in (0, 1)]
    assert [it.key for it in picked[0]] == [it.key for it in picked[1]]  # the same subset on every run
    assert len({it.class_name for it in picked[0]}) > 1  # was: the first 3, all ApplyEyeMakeup

    def fd(out, *flags):
        with pytest.warns(UserWarning, match="RANDOM"):
            ldm(["eval", "gen", "--checkpoint", str(named_dit), "--i3d", str(tmp_path / "i3d_torchscript.pt"),
                 "--fvd-frames", "8", "--steps", "1", "--batch-size", "2", "--device", "cpu", "--output",
                 str(tmp_path / out), *flags])
        return json.loads((tmp_path / out / "result.json").read_text())["fd"]

    ref = fd("ref", "--reference", str(ucf / "UCF-101"), "--classes", str(lists / "classInd.txt"), "--split",
             str(lists / "testlist01.txt"))
    assert ref["conditioning"] == {"text": False, "class": True, "class_dist": "reference", "seed": 0,
                                   "per_class": dict.fromkeys(CLASSES, 1)}
    assert ref["reference_clips"]["used"] == 3 and ref["reference_clips"]["class_ids_from"] == "names"
    # matched by name: Basketball is id 1 of the DiT, also where the reference's own folders number it 0
    named = fd("named", "--reference", str(sub), "--classes", "folder", "--num", "5", "--class-dist", "uniform")
    assert named["conditioning"]["per_class"] == {"Basketball": 3, "HandstandPushups": 2}
    assert named["reference_clips"]["chosen"] == "random 5 of 6 (seed 0)"
    again = fd("again", "--reference", str(sub), "--classes", "folder", "--num", "5", "--class-dist", "uniform")
    assert again["fvd"]["fvd"] == named["fvd"]["fvd"] and again["conditioning"] == named["conditioning"]
    (sub / "YoYo").mkdir()
    (sub / "YoYo" / "v_YoYo_g01_c01.avi").write_bytes(next((sub / "Basketball").glob("*.avi")).read_bytes())
    with pytest.raises(UserError, match="class 'YoYo' .YoYo/v_YoYo_g01_c01. is not one of the 3 classes this DiT"), \
            pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "gen", "--checkpoint", str(named_dit), "--i3d", str(tmp_path / "i3d_torchscript.pt"),
             "--fvd-frames", "8", "--reference", str(sub), "--classes", "folder", "--output", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_eval_gen_refuses_reference_classes_outside_the_dit(ucf, named_dit, tmp_path):
    model, context = dit.load_export(named_dit)  # an export made before class names were kept: ids only
    dit.save_export(tmp_path / "export", model.state_dict(), model.config, dataclasses.replace(context, class_names=()))
    (tmp_path / "names.txt").write_text("\n".join(["Archery", "Biking", *CLASSES]) + "\n")  # ids 2, 3, 4
    from test_evaluate import TinyI3D

    i3d = str(tmp_path / "i3d_torchscript.pt")
    torch.jit.save(torch.jit.script(TinyI3D()), i3d)
    with pytest.raises(UserError, match="v_HandStandPushups_g01_c01 has class id 4, outside this DiT's 3 classes "
                                        ".ids 0 to 2.; give --classes the class list of its training data"), \
            pytest.warns(UserWarning, match="RANDOM"):  # was: an IndexError traceback in the class embedding
        ldm(["eval", "gen", "--checkpoint", str(tmp_path), "--reference", str(ucf / "UCF-101"), "--classes",
             str(tmp_path / "names.txt"), "--i3d", i3d, "--fvd-frames", "8", "--output", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()


def test_the_closing_sample_hint_names_the_classes():
    from launch.train import sample_conditions
    cls, config = autoencoders.REGISTRY["kl2d-f8c4-debug"]
    spec = cls(config).latent_spec(8, 32, 32)
    dcfg = dit.make_config("dit-debug", spec, num_classes=3)
    context = dit.Export(autoencoder=AERecord(name="kl2d-f8c4-debug", family="kl2d", config=cfglib.to_dict(config)),
                         video=ClipSpec(8, 32, 32), latent_spec=spec.to_dict(), form="grid", num_classes=3)
    assert sample_conditions(dcfg, context) == "--class N (0 to 2)"
    named = dataclasses.replace(context, class_names=("Apply Eye Makeup", "Basketball", "YoYo"))
    assert sample_conditions(dcfg, named) == "--class ID|NAME (0 to 2, e.g. 'Apply Eye Makeup')"  # was: N only
    assert sample_conditions(dit.make_config("dit-debug", spec), context) == "--unconditional N"

"""What makes an `ldm eval` number reportable: which clips it was measured on (a seeded random
subset across classes, UCF-101's test split), how many (and a warning below the protocol's size),
and, for FVD over training, the same reference statistics for every checkpoint."""
import json

import pytest

from launch.cli import main as ldm
from test_classes import _avi

CLASSES = ["ApplyEyeMakeup", "Basketball", "YoYo"]


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """UCF-101's layout, 3 classes x 3 videos (groups 1-2 test, 8 train), with its split lists."""
    root = tmp_path_factory.mktemp("ucf")
    (root / "lists").mkdir()
    test = []
    for i, c in enumerate(CLASSES):
        (root / "UCF-101" / c).mkdir(parents=True)
        for g in (1, 2, 8):
            _avi(root / "UCF-101" / c / f"v_{c}_g{g:02d}_c01.avi", 40 + 60 * i + g)
            test += [f"{c}/v_{c}_g{g:02d}_c01.avi"] if g < 8 else []
    (root / "lists" / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    (root / "lists" / "testlist01.txt").write_text("".join(f"{x}\n" for x in test))
    return root


def _recon(tmp_path, name, *flags):
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--frames", "8", "--height", "32", "--width", "32",
             "--device", "cpu", "--output", str(tmp_path / name), *flags])
    return json.loads((tmp_path / name).read_text())


def test_eval_recon_takes_a_seeded_random_subset_across_classes(ucf, tmp_path):
    """``--num`` is a random N seeded by ``--seed`` (was: the first N sorted, all ApplyEyeMakeup);
    ``--classes`` / ``--split`` as on eval gen; the JSON says how the clips were chosen."""
    r = _recon(tmp_path, "a.json", "--input", str(ucf / "UCF-101"), "--num", "3", "--classes", "folder")
    assert r["clips"] == 3 and r["input_clips"]["chosen"] == "random 3 of 9 (seed 0)"
    assert r["input_clips"]["classes_covered"] != "1 of 3"
    again = _recon(tmp_path, "b.json", "--input", str(ucf / "UCF-101"), "--num", "3", "--classes", "folder")
    assert again["psnr_db"] == r["psnr_db"] and again["input_clips"] == r["input_clips"]  # the same clips each run
    other = _recon(tmp_path, "c.json", "--input", str(ucf / "UCF-101"), "--num", "3", "--seed", "1")
    assert other["input_clips"]["chosen"] == "random 3 of 9 (seed 1)" and other["psnr_db"] != r["psnr_db"]
    first = _recon(tmp_path, "e.json", "--input", str(ucf / "UCF-101"), "--num", "3", "--first", "--classes", "folder")
    assert first["input_clips"] | {"classes": None} == {"classes": None, "split": None, "listed": 9, "used": 3,
                                                        "chosen": "first 3 of 9 in listing order",
                                                        "classes_covered": "1 of 3"}  # as train-ae's val.clips
    split = _recon(tmp_path, "d.json", "--input", str(ucf / "UCF-101"), "--classes", str(ucf / "lists" / "classInd.txt"),
                   "--split", str(ucf / "lists" / "testlist01.txt"))
    assert split["clips"] == 6 and split["input_clips"] | {"classes": None, "split": None} == {
        "classes": None, "split": None, "listed": 6, "used": 6, "chosen": "all", "classes_covered": "3 of 3"}
    assert (split["read_fps"], split["dtype"]) == (None, "float32")

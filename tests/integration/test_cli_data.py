"""The data commands end to end: phantom -> prepare, and the failure modes a user sees."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np

from bonecluster.cli import main
from bonecluster.data.cache import PreparedDataset


def test_phantom_then_prepare(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "ph"), "--n", "28", "--size", "48", "--seed", "1"]) == 0
    assert "wrote 28 images" in capsys.readouterr().out
    (tmp_path / "ph" / "train" / "XR_HAND" / "junk.png").write_bytes(b"")  # one bad file
    assert main(["prepare", str(tmp_path / "ph"), "--size", "32", "--out", str(tmp_path / "c"),
                 "--workers", "1"]) == 0
    out = capsys.readouterr()
    assert "prepared 28 images at 32 px" in out.out and "skipped 0" in out.out
    ds = PreparedDataset.load(tmp_path / "c" / "dataset.json")
    assert len(ds) == 28 and ds.images().shape == (28, 32, 32)
    assert {r.body_part for r in ds.records} == {"ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS",
                                                  "SHOULDER", "WRIST"}
    assert (tmp_path / "c" / "skipped.csv").read_text().startswith("path,reason")


def test_prepare_reports_bad_files_and_goes_on(tmp_path, capsys, caplog):
    assert main(["phantom", str(tmp_path / "ph"), "--n", "14", "--size", "40"]) == 0
    bad = next((tmp_path / "ph").rglob("*.png"))
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    assert main(["prepare", str(tmp_path / "ph"), "--size", "24", "--out", str(tmp_path / "c"),
                 "--workers", "1"]) == 0
    out = capsys.readouterr()
    assert "prepared 13 images" in out.out and "skipped 1" in out.out
    assert f"skipped {bad}: truncated" in caplog.text
    skipped = (tmp_path / "c" / "skipped.csv").read_text()
    assert str(bad) in skipped


def test_no_usable_image_exits_non_zero_with_message(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jpg").write_bytes(b"\xff\xd8 nothing")
    assert main(["prepare", str(tmp_path / "d"), "--out", str(tmp_path / "c"), "--workers", "1"]) == 1
    assert "no usable image" in capsys.readouterr().err


def test_missing_data_folder_exits_non_zero(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    exe = shutil.which("bonecluster") or str(__import__("pathlib").Path(sys.executable).parent / "bonecluster")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "prepare" in r.stdout and "phantom" in r.stdout


def test_prepare_with_deskew_caches_the_straightened_film(tmp_path, capsys):
    from PIL import Image

    from bonecluster.data.decode import Preprocess, load_image

    film = np.zeros((120, 160), np.uint8)
    film[20:100, 50:100] = 150
    film[25:95, 70:80] = 240                                  # a bone down the film
    tilted = Image.fromarray(film).rotate(25, resample=Image.Resampling.BILINEAR, expand=True)
    (tmp_path / "d").mkdir()
    tilted.save(tmp_path / "d" / "tilted.png")
    assert main(["prepare", str(tmp_path / "d"), "--size", "32", "--fit", "deskew", "--out", str(tmp_path / "c"),
                 "--workers", "1"]) == 0
    cached = PreparedDataset.load(tmp_path / "c" / "dataset.json").images()[0]
    path = tmp_path / "d" / "tilted.png"
    np.testing.assert_array_equal(cached, load_image(path, Preprocess(32, "deskew")))
    # upright again: the film is a centred portrait band, the bone its brightest column
    cols = np.flatnonzero((cached > 8).any(axis=0))
    assert 18 <= len(cols) <= 22 and not (load_image(path, Preprocess(32, "letterbox")) == cached).all()
    assert cached.mean(axis=0).argmax() in range(14, 18)

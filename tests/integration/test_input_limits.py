"""Input limits at the command line: over a limit, the file (or CSV row) is skipped with a warning
naming it and the limit; raising the limit with its flag lets the same input through.

Limits (flag -> config key, default): --max-pixels -> data.pixel_cap (64000000),
--max-frames -> data.max_frames (16), --max-file-mb -> data.max_file_mb (512),
--max-csv-row-chars -> data.max_csv_row_chars (65536). The viewer's upload cap
(``serve --max-upload-mb``) is tested in tests/integration/test_serve.py.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonecluster.cli import main
from bonecluster.config import Config, to_yaml
from bonecluster.data.cache import PreparedDataset
from tests.conftest import write_png
from tests.unit.dicom_utils import write_dicom


def _prepare(data: Path | str, out: Path, *flags: str) -> int:
    return main(["prepare", str(data), "--out", str(out), "--workers", "1", "--size", "16", *flags])


def _skipped(out: Path) -> dict[str, str]:
    with open(out / "skipped.csv", newline="") as fh:
        return {row["path"]: row["reason"] for row in csv.DictReader(fh)}


def _kept(out: Path) -> list[str]:
    return [Path(r.path).name for r in PreparedDataset.load(out / "dataset.json").records]


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder with a 60x50 PNG (3000 px), a 20x20 PNG (400 px) and a 3-frame 8x8 DICOM."""
    folder = tmp_path / "in"
    write_png(folder / "big.png", shape=(50, 60))
    write_png(folder / "small.png", shape=(20, 20))
    frames = (np.arange(3 * 8 * 8).reshape(3, 8, 8) * 50).astype(np.uint16)
    write_dicom(folder / "cine.dcm", frames)
    return folder


def test_pixel_cap(images, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="bonecluster"):
        assert _prepare(images, tmp_path / "c1", "--max-pixels", "1000") == 0
    assert "skipped 1" in capsys.readouterr().out
    big = str(images / "big.png")
    assert _skipped(tmp_path / "c1") == {
        big: "image too large: 60x50 px exceeds pixel cap 1000 (decompression-bomb guard)"}
    assert f"skipped {big}: image too large" in caplog.text
    assert _prepare(images, tmp_path / "c2", "--max-pixels", "3000") == 0
    assert sorted(_kept(tmp_path / "c2")) == ["big.png", "cine.dcm", "small.png"]


def test_pixel_cap_flag_is_sugar_for_set(images, tmp_path):
    assert _prepare(images, tmp_path / "c1", "--set", "data.pixel_cap=1000") == 0
    assert sorted(_kept(tmp_path / "c1")) == ["cine.dcm", "small.png"]
    # the flag is applied after --set, so it wins
    assert _prepare(images, tmp_path / "c2", "--set", "data.pixel_cap=1000", "--max-pixels", "5000") == 0
    assert len(_kept(tmp_path / "c2")) == 3


def test_dicom_frame_count(images, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="bonecluster"):
        assert _prepare(images, tmp_path / "c1", "--max-frames", "2") == 0
    cine = str(images / "cine.dcm")
    assert _skipped(tmp_path / "c1") == {cine: "DICOM has 3 frames, limit is 2"}
    assert f"skipped {cine}: DICOM has 3 frames" in caplog.text
    assert _prepare(images, tmp_path / "c2", "--max-frames", "3") == 0
    assert "cine.dcm" in _kept(tmp_path / "c2")


def test_file_size(tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (100, 100), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noisy.png")  # ~10 KB: noise does not compress
    write_png(folder / "small.png", value=7, shape=(8, 8))
    size = (folder / "noisy.png").stat().st_size
    assert size > 8 * 1024
    with caplog.at_level(logging.WARNING, logger="bonecluster"):
        assert _prepare(folder, tmp_path / "c1", "--max-file-mb", str(8 / 1024)) == 0  # 8 KiB
    noisy = str(folder / "noisy.png")
    assert _skipped(tmp_path / "c1") == {
        noisy: f"file too large: {size} bytes exceeds the file size limit of 8192 bytes"}
    assert f"skipped {noisy}: file too large" in caplog.text
    assert _prepare(folder, tmp_path / "c2", "--max-file-mb", str(size / 2**20)) == 0  # exactly the size
    assert sorted(_kept(tmp_path / "c2")) == ["noisy.png", "small.png"]


def test_csv_row_length(tmp_path, caplog):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png", seed=1)
    manifest = tmp_path / "m.csv"
    long_row = f"b.png,HAND,1,{'p' * 300},,"  # 313 characters
    manifest.write_text(f"path,body_part,abnormal,patient,study,split\r\na.png,WRIST,0,,,\r\n{long_row}\r\n")
    with caplog.at_level(logging.WARNING, logger="bonecluster"):
        assert _prepare(manifest, tmp_path / "c1", "--max-csv-row-chars", "100") == 0
    where = f"{manifest}:3"
    assert _skipped(tmp_path / "c1") == {
        where: "malformed row: longer than 100 characters (limit max_csv_row_chars)"}
    assert f"skipped {where}: malformed row: longer than 100" in caplog.text
    assert _prepare(manifest, tmp_path / "c2", "--max-csv-row-chars", str(len(long_row))) == 0  # at the limit
    assert sorted(_kept(tmp_path / "c2")) == ["a.png", "b.png"]


def test_csv_header_over_the_row_limit_is_an_error(tmp_path, capsys):
    write_png(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,body_part,abnormal,patient,study,split\na.png,WRIST,0,,,\n")
    assert _prepare(manifest, tmp_path / "c", "--max-csv-row-chars", "20") == 1
    err = capsys.readouterr().err
    assert f"error: {manifest}:1: header line longer than 20 characters (limit max_csv_row_chars)" in err


@pytest.mark.parametrize("flag,value", [("--max-pixels", "0"), ("--max-frames", "-1"), ("--max-file-mb", "inf"),
                                        ("--max-csv-row-chars", "lots")])
def test_bad_limit_values_are_refused(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _prepare(tmp_path, tmp_path / "c", flag, value)
    assert info.value.code == 2
    assert f"argument {flag}: must be a positive" in capsys.readouterr().err


def test_bad_limit_given_with_set_names_the_flag(images, tmp_path, capsys):
    assert _prepare(images, tmp_path / "c", "--set", "data.max_frames=0") == 1
    assert "data.max_frames (--max-frames) must be a positive integer, got 0" in capsys.readouterr().err


def test_raising_a_limit_retries_a_file_skipped_in_the_same_cache(images, tmp_path):
    assert _prepare(images, tmp_path / "c", "--max-pixels", "1000") == 0
    assert _prepare(images, tmp_path / "c", "--max-pixels", "5000") == 0
    assert "big.png" in _kept(tmp_path / "c")


# --------------------------------------------------------------------------- train and predict


def test_train_maps_the_limit_flags_onto_its_config(monkeypatch, tmp_path):
    import bonecluster.pipeline

    seen = {}

    def fake_train(sources, run, cfg, **kw):
        seen["data"] = cfg.data
        return {"is_main": False}

    monkeypatch.setattr(bonecluster.pipeline, "train", fake_train)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--max-pixels", "123",
                 "--max-frames", "2", "--max-file-mb", "1.5", "--max-csv-row-chars", "99",
                 "--set", "data.max_frames=7"]) == 0
    data = seen["data"]
    assert (data.pixel_cap, data.max_frames, data.max_file_mb, data.max_csv_row_chars) == (123, 2, 1.5, 99)
    assert data.limits().max_file_bytes == int(1.5 * 2**20)


class _FakePredictor:
    """Stands in for a trained run's models: predict only needs to see what decoded."""

    def __init__(self, run, device="cpu"):
        pass

    def stage2_data(self, data, *args, **kwargs):
        return data

    def predict(self, data, use_metadata_parts=True, stage2_data=None):
        from bonecluster.predict import ImagePrediction

        return [ImagePrediction(r.path, None, None, None, None, None, None, None, r.study) for r in data.records]


def test_predict_applies_the_limit_flags_over_the_runs_config(images, tmp_path, monkeypatch, capsys):
    import bonecluster.predict

    run = tmp_path / "run"
    run.mkdir()
    cfg = Config()
    cfg.data.pixel_cap = 1000  # the run's own limit
    (run / "config.yaml").write_text(to_yaml(cfg))
    monkeypatch.setattr(bonecluster.predict, "check_run", lambda r: Path(r))
    monkeypatch.setattr(bonecluster.predict, "Predictor", _FakePredictor)

    assert main(["predict", str(run), str(images), "--quiet"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert [s["path"] for s in report["skipped"]] == [str(images / "big.png")]
    assert "exceeds pixel cap 1000" in report["skipped"][0]["reason"]
    assert f"skipped {images / 'big.png'}: image too large" in out.err

    assert main(["predict", str(run), str(images), "--quiet", "--max-pixels", "3000", "--max-frames", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(Path(p["path"]).name for p in report["images"]) == ["big.png", "small.png"]
    assert report["skipped"] == [{"path": str(images / "cine.dcm"), "reason": "DICOM has 3 frames, limit is 2"}]


def test_evaluate_applies_the_limit_flags_over_the_runs_config(monkeypatch, tmp_path):
    import bonecluster.evaluate
    import bonecluster.report

    seen = {}

    def fake_evaluate(run, sources, json_path=None, report_dir=None, progress=True, limits=None):
        seen["limits"] = limits
        return {"skipped_files": 0}

    monkeypatch.setattr(bonecluster.evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr(bonecluster.report, "comparison_table", lambda m: "")
    assert main(["evaluate", str(tmp_path), str(tmp_path), "--quiet", "--max-pixels", "500"]) == 0
    assert seen["limits"] == {"pixel_cap": 500}

"""Input limits: documented defaults that agree everywhere, flags that map onto the config, values
checked, and the edges of each limit (exactly at it passes, one over is skipped, raising it lets
the input through). The command-line side is in tests/integration/test_input_limits.py."""

from __future__ import annotations

import argparse
import io
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

from bonecluster.cli import build_parser
from bonecluster.config import Config, DataConfig, apply_override
from bonecluster.data import SkipLog, read_records
from bonecluster.data.decode import Limits, read_grey
from bonecluster.data.readers import DataError, ReaderLimits, read_manifest
from bonecluster.data.records import SkipError
from tests.conftest import write_png
from tests.unit.dicom_utils import dicom_dataset

DEFAULTS = {"pixel_cap": 64_000_000, "max_frames": 16, "max_file_mb": 512, "max_csv_row_chars": 65_536}


def test_documented_defaults_agree_everywhere():
    data = DataConfig()
    assert {name: getattr(data, name) for name in DataConfig.LIMITS} == DEFAULTS
    assert data.limits() == Limits() == Limits(64_000_000, 16, 512 * 2**20)
    assert data.reader_limits() == ReaderLimits() == ReaderLimits(65_536)
    serve = build_parser().parse_args(["serve", "run"])
    assert serve.max_upload_mb == 50


@pytest.mark.parametrize("command", [["prepare", "d", "--out", "o"], ["train", "d", "--out", "o"],
                                     ["predict", "run", "x"]])
def test_each_limit_has_a_flag_whose_help_gives_the_default(command):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {opt: action.help for action in subparsers.choices[command[0]]._actions for opt in action.option_strings}
    for name, flag in DataConfig.LIMITS.items():
        assert f"data.{name}" in helps[flag] and str(DEFAULTS[name]) in helps[flag], (flag, helps[flag])
    args = parser.parse_args(command + ["--max-pixels", "5", "--max-frames", "3", "--max-file-mb", "0.5",
                                        "--max-csv-row-chars", "40"])
    assert (args.max_pixels, args.max_frames, args.max_file_mb, args.max_csv_row_chars) == (5, 3, 0.5, 40)


def test_set_and_flag_reach_the_same_fields():
    cfg = Config()
    for item in ("data.pixel_cap=5", "data.max_frames=3", "data.max_file_mb=0.5", "data.max_csv_row_chars=40"):
        cfg = apply_override(cfg, item)
    assert cfg.data.limits() == Limits(pixel_cap=5, max_frames=3, max_file_bytes=2**19)
    assert cfg.data.reader_limits() == ReaderLimits(40)
    assert Config().data.with_limits(pixel_cap=5, max_frames=3, max_file_mb=0.5, max_csv_row_chars=40) == cfg.data


@pytest.mark.parametrize("name,value,flag", [("pixel_cap", "0", "--max-pixels"), ("max_frames", "-2", "--max-frames"),
                                             ("max_file_mb", "0.0000000001", "--max-file-mb"),
                                             ("max_csv_row_chars", "0", "--max-csv-row-chars")])
def test_bad_limit_values_name_the_key_and_flag(name, value, flag):
    with pytest.raises(ValueError, match=rf"data\.{name} \({flag}\) must be a positive"):
        apply_override(Config(), f"data.{name}={value}").data.limits()
    with pytest.raises(ValueError, match=rf"data\.{name} \({flag}\)"):
        DataConfig().with_limits(**{name: float(value) if "." in value else int(value)})


def test_with_limits_changes_only_limits():
    with pytest.raises(ValueError, match="not an input limit: size"):
        DataConfig().with_limits(size=32)


@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_reader_limits_are_checked(value):
    with pytest.raises(ValueError, match="max_csv_row_chars must be a positive int"):
        ReaderLimits(value)


# --------------------------------------------------------------------------- CSV rows


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_a_row_at_the_limit_is_kept_and_one_over_is_skipped_whatever_the_line_ending(tmp_path, ending):
    write_png(tmp_path / "ok.png")
    at = "ok.png,WRIST,0," + "p" * 25   # 40 characters
    over = "ok.png,HAND,1," + "q" * 27  # 41 characters
    rows = ["path,body_part,abnormal,patient", at, over, at.replace("WRIST", "ELBOW"), "gone.png,HAND,1,"]
    path = tmp_path / "m.csv"
    path.write_bytes(ending.join(rows).encode() + ending.encode())
    skips = SkipLog()
    records = read_manifest(path, skips, ReaderLimits(40))
    assert [r.body_part for r in records] == ["WRIST", "ELBOW"]
    # line numbers stay right after the over-long row (its "\r\n" may be split by the read)
    assert [(s.path.rsplit("/", 1)[-1], s.reason.split(":")[0]) for s in skips.items] == [
        ("m.csv:3", "malformed row"), ("gone.png", "listed in m.csv")]
    assert skips.items[1].reason == "listed in m.csv:5 but missing"
    assert "longer than 40 characters (limit max_csv_row_chars)" in skips.items[0].reason


def test_a_huge_line_is_never_held_in_memory(tmp_path):
    write_png(tmp_path / "ok.png")
    path = tmp_path / "m.csv"
    path.write_text("path,body_part,abnormal\n" + "x" * 5_000_000 + "\nok.png,WRIST,1\n")
    skips = SkipLog()
    records = read_manifest(path, skips, ReaderLimits(100))
    assert len(records) == 1 and len(skips) == 1 and skips.items[0].path.endswith("m.csv:2")


def test_header_over_the_limit_or_unparsable_is_a_data_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,body_part,abnormal\nok.png,WRIST,1\n")
    with pytest.raises(DataError, match=r"m\.csv:1: header line longer than 10 characters"):
        read_manifest(path, SkipLog(), ReaderLimits(10))
    path.write_text("path,body_part,\0abnormal\nok.png,WRIST,1\n")  # csv: "line contains NUL"
    with pytest.raises(DataError, match=r"m\.csv"):  # not line 2 taken as the header
        read_manifest(path, SkipLog())


def test_mura_csvs_obey_the_row_limit(tmp_path):
    root = tmp_path / "MURA-v1.1"
    rel = "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/image1.png"
    write_png(tmp_path / rel)
    (root / "train_image_paths.csv").write_text(rel + "\n")
    (root / "train_labeled_studies.csv").write_text(rel.rsplit("/", 1)[0] + "/,1\n")
    assert len(read_records(root, SkipLog())) == 1
    skips = SkipLog()
    assert read_records(root, skips, ReaderLimits(40)) == []
    assert {s.path.rsplit("/", 1)[-1] for s in skips.items} == {"train_image_paths.csv:1",
                                                               "train_labeled_studies.csv:1"}


# --------------------------------------------------------------------------- DICOM: inflated size, codestream size


def _deflated_dicom(path, pixel_bytes: int):
    """A deflated 16x16 DICOM whose pixel data element holds ``pixel_bytes`` zero bytes."""
    ds = dicom_dataset(np.zeros((16, 16), np.uint16))
    ds.PixelData = bytes(pixel_bytes)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.filterwarnings("ignore:The number of bytes of pixel data")
def test_deflated_dicom_is_bounded_by_the_file_size_limit(tmp_path):
    path = _deflated_dicom(tmp_path / "d.dcm", 4 * 2**20)
    assert path.stat().st_size < 10_000  # 4 MiB of zeros deflate to a few KB
    with pytest.raises(SkipError, match=r"inflates to over 1048576 bytes, the file size limit"):
        read_grey(path, Limits(max_file_bytes=2**20))
    assert read_grey(path, Limits(max_file_bytes=8 * 2**20)).shape == (16, 16)


def test_ordinary_deflated_dicom_still_decodes(tmp_path):
    ds = dicom_dataset((np.arange(256).reshape(16, 16) * 9).astype(np.uint16))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "d.dcm", enforce_file_format=True)
    grey = read_grey(tmp_path / "d.dcm")
    assert grey.shape == (16, 16) and grey.max() == 255 * 9


def _jpeg_dicom(path, rows: int, cols: int, side: int):
    buf = io.BytesIO()
    Image.new("L", (side, side), 100).save(buf, "JPEG")
    ds = dicom_dataset(np.zeros((rows, cols), np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_pixel_cap_applies_to_the_jpeg_codestream_inside_a_dicom(tmp_path):
    liar = _jpeg_dicom(tmp_path / "liar.dcm", 16, 16, side=300)  # says 16x16, holds 300x300
    with pytest.raises(SkipError, match="300x300 px exceeds pixel cap 10000"):
        read_grey(liar, Limits(pixel_cap=10_000))
    honest = _jpeg_dicom(tmp_path / "honest.dcm", 300, 300, side=300)
    with pytest.raises(SkipError, match="300x300 px exceeds pixel cap 10000"):
        read_grey(honest, Limits(pixel_cap=10_000))
    assert read_grey(honest, Limits(pixel_cap=90_000)).shape == (300, 300)


def test_compressed_dicom_with_garbage_codestream_is_a_skip(tmp_path):
    ds = dicom_dataset(np.zeros((16, 16), np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([zlib.compress(b"not a jpeg" * 10)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "g.dcm", enforce_file_format=True)
    with pytest.raises(SkipError, match="unreadable DICOM pixel data"):
        read_grey(tmp_path / "g.dcm")

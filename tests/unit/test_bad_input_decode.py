"""Bad files: each must become a SkipError whose message names the problem, never a crash."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from bonecluster.data.decode import Limits, load_image, read_grey
from tests.unit.dicom_utils import dicom_dataset as make_dicom_dataset
from bonecluster.data.records import SkipError

PIXELS = (np.arange(40 * 50).reshape(40, 50) % 251).astype(np.uint8)


def encoded(fmt: str, **kw) -> bytes:
    """A valid small image file's bytes."""
    buf = io.BytesIO()
    Image.fromarray(PIXELS).save(buf, fmt, **kw)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def dicom_dataset(rows: int = 4, cols: int = 5, frames: int = 1) -> Dataset:
    """A minimal valid MONOCHROME2 16-bit DICOM dataset with file meta."""
    pixels = np.arange(rows * cols * frames, dtype="<u2").reshape((frames, rows, cols) if frames > 1 else (rows, cols))
    return make_dicom_dataset(pixels)


def save_dicom(path: Path, ds: Dataset, **kw) -> Path:
    ds.save_as(path, enforce_file_format=True, **kw)
    return path


def skip_reason(path, limits: Limits = Limits()) -> str:
    """The SkipError message for `path`; read_grey and load_image must agree."""
    with pytest.raises(SkipError) as info:
        read_grey(path, limits)
    with pytest.raises(SkipError):
        load_image(path, limits=limits)
    return str(info.value)


# --------------------------------------------------------------------------- any file


def test_missing_file(tmp_path):
    assert skip_reason(tmp_path / "nope.png") == "file not found"


def test_zero_byte_file(tmp_path):
    assert skip_reason(write(tmp_path / "empty.png", b"")) == "empty file (0 bytes)"


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "dir.png").mkdir()
    assert "not a regular file" in skip_reason(tmp_path / "dir.png")


def test_file_over_byte_limit(tmp_path):
    path = write(tmp_path / "a.png", encoded("PNG"))
    assert "file too large" in skip_reason(path, Limits(max_file_bytes=10))


def test_text_file_named_png(tmp_path):
    path = write(tmp_path / "notes.png", b"patient notes, not pixels\n" * 20)
    assert skip_reason(path) == "not an image (unrecognised format)"


# --------------------------------------------------------------------------- truncation


def test_truncated_png(tmp_path):
    data = encoded("PNG")
    path = write(tmp_path / "cut.png", data[: len(data) // 2])
    assert "truncated or corrupt image" in skip_reason(path)


def test_png_cut_inside_header(tmp_path):
    path = write(tmp_path / "cut.png", encoded("PNG")[:20])
    assert skip_reason(path).startswith("truncated or corrupt image")


def test_truncated_jpeg(tmp_path):
    data = encoded("JPEG", quality=90)
    path = write(tmp_path / "cut.jpg", data[: len(data) // 2])
    assert "truncated or corrupt image" in skip_reason(path)


def test_truncated_load_flag_left_alone(tmp_path):
    data = encoded("PNG")
    skip_reason(write(tmp_path / "cut.png", data[: len(data) // 2]))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- size guards


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched to claim width x height (CRC fixed up)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_header(tmp_path):
    # PIL's own guard fires inside Image.open here; it must still read as ours.
    reason = skip_reason(write(tmp_path / "bomb.png", png_claiming(100_000, 100_000)))
    assert reason == (
        "image too large: 10000000000 px exceeds pixel cap 64000000 (decompression-bomb guard)"
    )


def test_pil_bomb_warning_is_a_skip(tmp_path):
    # 9500 x 9500 = 90.25M px: PIL only *warns* (limit 89.5M); that must still skip,
    # even when our own cap would allow it.
    path = write(tmp_path / "bomb.png", png_claiming(9500, 9500))
    reason = skip_reason(path, Limits(pixel_cap=10**9))
    assert reason.startswith("image too large: 90250000 px exceeds PIL limit")


def test_header_over_our_cap_but_under_pil_limit(tmp_path):
    # 8000 x 8001 = 64.0M px: above our cap, below PIL's 89M warning level.
    reason = skip_reason(write(tmp_path / "big.png", png_claiming(8000, 8001)))
    assert reason == (
        "image too large: 8000x8001 px exceeds pixel cap 64000000 (decompression-bomb guard)"
    )


def test_small_pixel_cap_on_normal_image(tmp_path):
    path = write(tmp_path / "a.png", encoded("PNG"))
    reason = skip_reason(path, Limits(pixel_cap=100))
    assert reason == "image too large: 50x40 px exceeds pixel cap 100 (decompression-bomb guard)"


def test_small_pixel_cap_on_dicom(tmp_path):
    path = save_dicom(tmp_path / "a.dcm", dicom_dataset(rows=20, cols=30))
    assert "30x20 px exceeds pixel cap 100" in skip_reason(path, Limits(pixel_cap=100))


def test_too_many_dicom_frames(tmp_path):
    path = save_dicom(tmp_path / "cine.dcm", dicom_dataset(rows=2, cols=2, frames=500))
    assert skip_reason(path) == "DICOM has 500 frames, limit is 16"


# --------------------------------------------------------------------------- DICOM


@pytest.mark.filterwarnings("ignore:VR lookup failed")
def test_garbage_after_dicom_preamble(tmp_path):
    path = write(tmp_path / "bad.dcm", b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    assert skip_reason(path).startswith("unreadable DICOM")


def test_dicom_truncated_mid_element(tmp_path):
    data = save_dicom(tmp_path / "ok.dcm", dicom_dataset(rows=20, cols=30)).read_bytes()
    path = write(tmp_path / "cut.dcm", data[: len(data) - 700])  # inside the pixel data
    assert skip_reason(path).startswith("unreadable DICOM pixel data")
    for cut in (200, 300):  # inside the file meta; just after it
        path = write(tmp_path / f"cut{cut}.dcm", data[:cut])
        assert skip_reason(path).startswith("unreadable DICOM")


def test_dcm_suffix_but_not_dicom(tmp_path):
    path = write(tmp_path / "fake.dcm", encoded("PNG"))
    assert skip_reason(path).startswith("unreadable DICOM: not a DICOM file")


def test_dicom_without_pixel_data(tmp_path):
    ds = dicom_dataset()
    del ds.PixelData
    assert skip_reason(save_dicom(tmp_path / "sr.dcm", ds)) == "DICOM has no pixel data"


def test_unsupported_transfer_syntax(tmp_path):
    ds = dicom_dataset()
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # 1.2.840.10008.1.2.4.80
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 60 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    reason = skip_reason(save_dicom(tmp_path / "jls.dcm", ds))
    assert reason.startswith("unsupported DICOM transfer syntax 1.2.840.10008.1.2.4.80 (JPEG-LS")
    assert "pylibjpeg" in reason


def test_unknown_private_transfer_syntax(tmp_path):
    ds = dicom_dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    ds["PixelData"].VR = "OB"
    path = save_dicom(tmp_path / "priv.dcm", ds, implicit_vr=False, little_endian=True)
    reason = skip_reason(path)
    assert reason.startswith("unsupported DICOM transfer syntax 1.2.3.4.5.6.7 (unknown)")

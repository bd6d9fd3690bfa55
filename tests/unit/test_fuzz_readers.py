"""Fuzzing the readers: mutated PNG/JPEG/TIFF/BMP/DICOM bytes and random CSV manifests.

Every example must end in one of the *allowed outcomes*:

* images (``read_grey``, ``decode_scaled``, ``load_image``): a decoded array of sane dtype and
  shape, or :class:`SkipError` (the documented "this file cannot be used" error);
* manifests (``read_manifest``, ``read_mura_csv``): a list of records, with bad rows in the
  SkipLog, or :class:`DataError` (the documented "this source cannot be used" error).

Anything else fails the example: another exception, a run over ``TIME_LIMIT_S`` (an interval
timer raises in the main thread; a long C call is caught by the wall-clock check after it
returns), or memory beyond the cap. Memory is measured as the growth of the process's peak
resident set (Linux ``VmHWM``, reset before each example through ``/proc/self/clear_refs``), and
``RLIMIT_AS`` is lowered to the current size plus ``ADDRESS_HEADROOM`` while the example runs, so
a runaway allocation fails fast with MemoryError (which also fails the example, also when a
decoder turned it into a SkipError) instead of taking the machine down.

The number of examples per test is fixed and the generation derandomised, so CI runs the same
cases every time: ``BONECLUSTER_FUZZ_EXAMPLES`` (default 120) sets it; a longer run is e.g.
``BONECLUSTER_FUZZ_EXAMPLES=4000 pytest tests/unit/test_fuzz_readers.py``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import resource
import signal
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian,
                         JPEG2000Lossless, JPEGBaseline8Bit, RLELossless)

from bonecluster.data.decode import Limits, Preprocess, decode_scaled, load_image, read_grey
from bonecluster.data.readers import DataError, ReaderLimits, read_manifest, read_mura_csv
from bonecluster.data.records import Record, SkipError, SkipLog
from tests.unit.dicom_utils import dicom_dataset

# Corrupt files make pydicom and Pillow warn (odd VRs, truncated data...); expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

EXAMPLES = int(os.environ.get("BONECLUSTER_FUZZ_EXAMPLES", "120"))
TIME_LIMIT_S = 5.0
MEMORY_CAP = 256 * 2**20        # growth of the peak resident set allowed per example
ADDRESS_HEADROOM = 1024 * 2**20  # RLIMIT_AS = current address space + this, while an example runs

# Small limits so that "too big" is reachable by mutation and the memory cap is meaningful:
# 2 Mpx at a few dozen bytes per pixel through the decode chain stays well under MEMORY_CAP.
LIMITS = Limits(pixel_cap=2_000_000, max_frames=4, max_file_bytes=2 * 2**20)
PRE = Preprocess(size=32, fit="letterbox")

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

_MEMORY_WORDS = re.compile(r"memoryerror|unable to allocate|cannot allocate|out of memory", re.I)


# --------------------------------------------------------------------------- bounded runs


class Hang(BaseException):
    """Raised by the interval timer. BaseException, so ``except Exception`` in a decoder cannot
    turn a hang into a SkipError."""


def _on_alarm(signum, frame):
    raise Hang()


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) if found else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


@dataclass
class Bounded:
    value: object
    seconds: float
    peak_growth: int | None  # bytes; None where the platform cannot measure it


def run_bounded(fn, seconds: float = TIME_LIMIT_S) -> Bounded:
    """Call ``fn()`` under the time limit and the address-space limit, and measure it.

    Raises AssertionError for a hang or for memory over the cap; lets fn's own exceptions out.
    """
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = _status_kib("VmSize")
    measurable = vm is not None and _reset_peak_rss()
    rss0 = _status_kib("VmRSS") if measurable else None
    if vm is not None:
        limit = vm * 1024 + ADDRESS_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        value = fn()
    except Hang:
        raise AssertionError(f"hang: still running after {seconds} s") from None
    except MemoryError as e:
        raise AssertionError(f"memory blow-up: MemoryError under RLIMIT_AS ({e})") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)
    took = time.perf_counter() - start
    growth = None
    if measurable:
        peak = _status_kib("VmHWM")
        growth = (peak - rss0) * 1024 if peak is not None and rss0 is not None else None
    assert took <= seconds, f"hang: took {took:.1f} s (limit {seconds} s)"
    assert growth is None or growth <= MEMORY_CAP, (
        f"memory blow-up: peak RSS grew by {growth / 2**20:.0f} MiB (cap {MEMORY_CAP / 2**20:.0f} MiB)")
    return Bounded(value, took, growth)


def test_the_bounds_really_fail():
    """The guards themselves: a hang, a big allocation and a MemoryError each fail."""
    with pytest.raises(AssertionError, match="hang"):
        run_bounded(lambda: time.sleep(2), seconds=0.2)  # a Python-level hang: the timer interrupts it
    with pytest.raises(AssertionError, match="hang"):
        run_bounded(lambda: Image.effect_noise((3000, 3000), 64), seconds=0.001)  # one C call: timed after it
    if _status_kib("VmSize") is not None and _reset_peak_rss():
        with pytest.raises(AssertionError, match="memory blow-up"):
            # touched: RSS grows to twice the cap. Twice, not just over: late in a full run the process
            # holds GBs, and the kernel reclaiming its cold pages meanwhile lowers the measured growth
            # (a fresh-clone run measured under 256 MiB for a 320 MiB array).
            run_bounded(lambda: np.ones(MEMORY_CAP // 4))
        with pytest.raises(AssertionError, match="memory blow-up"):
            run_bounded(lambda: np.empty(2 * ADDRESS_HEADROOM, np.uint8))  # over RLIMIT_AS
    assert run_bounded(lambda: 7).value == 7


# --------------------------------------------------------------------------- seeds


def _pil_bytes(arr: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _dicom_bytes(ds) -> bytes:
    # fixed UIDs: the seeds (and so every generated example) are the same bytes in every run
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _grad(h: int, w: int, dtype=np.uint8, top: int = 255) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 3, np.arange(w) * 5) % (top + 1)).astype(dtype)


def _make_seeds() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes of a valid small file, its suffix). Every seed decodes as an image."""
    g8, g16 = _grad(20, 24), _grad(20, 24, np.uint16, 4095)
    rgb = np.stack([g8, g8[::-1], 255 - g8], axis=-1)
    seeds = {
        "png-L": (_pil_bytes(g8, "PNG"), ".png"),
        "png-I16": (_pil_bytes(g16, "PNG"), ".png"),
        "png-RGB-interlaced": (_pil_bytes(rgb, "PNG", interlace=1), ".png"),
        "png-P": (_pil_bytes(rgb, "PNG", mode="P"), ".png"),
        "jpeg-L": (_pil_bytes(g8, "JPEG", quality=80), ".jpg"),
        "jpeg-RGB-progressive": (_pil_bytes(rgb, "JPEG", quality=80, progressive=True), ".jpeg"),
        "tiff-I16": (_pil_bytes(g16, "TIFF"), ".tif"),
        "bmp-RGB": (_pil_bytes(rgb, "BMP"), ".bmp"),
        "dicom-u16": (_dicom_bytes(dicom_dataset(g16, PatientID="P1")), ".dcm"),
        "dicom-mono1-window": (_dicom_bytes(dicom_dataset(
            g16, "MONOCHROME1", WindowCenter=150, WindowWidth=300, RescaleSlope=2, RescaleIntercept=-5)), ""),
        "dicom-frames": (_dicom_bytes(dicom_dataset(np.stack([g16, g16 // 2]))), ".dcm"),
        "dicom-rgb": (_dicom_bytes(dicom_dataset(rgb, "RGB")), ".dcm"),
        "dicom-palette": (_dicom_bytes(_palette_dataset(g8)), ".dcm"),
        "dicom-palette-segmented": (_dicom_bytes(_palette_dataset(g8, segmented=True)), ".dcm"),
    }
    rle = dicom_dataset(g16)
    rle.compress(RLELossless, encoding_plugin="pydicom")
    seeds["dicom-rle"] = (_dicom_bytes(rle), ".dcm")
    jpeg = dicom_dataset(g8)
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    jpeg.PixelData = encapsulate([_pil_bytes(g8, "JPEG", quality=90)])
    jpeg["PixelData"].VR = "OB"
    jpeg.BitsAllocated = jpeg.BitsStored = 8
    jpeg.HighBit = 7
    seeds["dicom-jpeg"] = (_dicom_bytes(jpeg), ".dcm")
    j2k = dicom_dataset(g8)
    j2k.file_meta.TransferSyntaxUID = JPEG2000Lossless
    j2k.PixelData = encapsulate([_pil_bytes(g8, "JPEG2000", irreversible=False, no_jp2=True)])
    j2k["PixelData"].VR = "OB"
    j2k.BitsAllocated = j2k.BitsStored = 8
    j2k.HighBit = 7
    seeds["dicom-j2k"] = (_dicom_bytes(j2k), ".dcm")
    deflated = dicom_dataset(_grad(180, 200, np.uint16, 4095))  # inflates to >64 KiB: several rounds
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    seeds["dicom-deflated"] = (_dicom_bytes(deflated), ".dcm")
    # bytes after the end of the deflate stream (pydicom pads an odd length with one): the first
    # bounded-inflate loop never ended on them
    seeds["dicom-deflated-padded"] = (seeds["dicom-deflated"][0] + b"\0", ".dcm")
    for name, uid in (("dicom-implicit", ImplicitVRLittleEndian), ("dicom-bigendian", ExplicitVRBigEndian)):
        ds = dicom_dataset(g16)
        ds.file_meta.TransferSyntaxUID = uid
        seeds[name] = (_dicom_bytes(ds), ".dcm")
    return seeds


def _palette_dataset(index: np.ndarray, segmented: bool = False):
    ds = dicom_dataset(index, "PALETTE COLOR")
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = index.tobytes()
    ramp = (np.arange(256, dtype="<u2") * 257)
    for colour, lut in (("Red", ramp), ("Green", ramp[::-1]), ("Blue", (ramp // 2))):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        if segmented:  # one discrete segment of 2 entries, then one linear segment to the end
            seg = np.array([0, 2, lut[0], lut[1], 1, 254, lut[-1]], dtype="<u2")
            setattr(ds, f"Segmented{colour}PaletteColorLookupTableData", seg.tobytes())
        else:
            setattr(ds, f"{colour}PaletteColorLookupTableData", lut.tobytes())
    return ds


SEEDS = _make_seeds()
SUFFIXES = (".png", ".jpg", ".tif", ".bmp", ".dcm", "", ".PNG")


# --------------------------------------------------------------------------- regressions
# Files the fuzzing (or reading the decoders it pointed at) found; each failed before the fix.


def _deflate_bomb(inflated_mib: int = 320) -> bytes:
    """A ~0.3 MB Deflated Explicit VR Little Endian DICOM whose dataset inflates to 320 MiB of
    zero pixel data. pydicom inflated it in one zlib.decompress before any limit was checked
    (a 50 MB upload would have become ~50 GB)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    def split(data: bytes) -> int:  # offset where the dataset starts, after the file meta
        buf = io.BytesIO(data)
        read_preamble(buf, False)
        _read_file_meta_info(buf)
        return buf.tell()

    ds = dicom_dataset(np.zeros((16, 16), np.uint16))
    plain = _dicom_bytes(ds)
    body = plain[split(plain):]
    pixel_tag = b"\xe0\x7f\x10\x00OW\x00\x00"
    body = body[:body.index(pixel_tag)] + pixel_tag + struct.pack("<I", inflated_mib * 2**20)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = _dicom_bytes(ds)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [deflated[:split(deflated)], packer.compress(body)]
    zeros = bytes(2**20)
    chunks += [packer.compress(zeros) for _ in range(inflated_mib)]
    return b"".join(chunks) + packer.flush()


def _jpeg_in_dicom_bomb(side: int = 6000) -> bytes:
    """A DICOM whose Rows x Columns say 16 x 16 but whose JPEG codestream is side x side RGB
    (~0.5 MB at 6000). The pixel cap looked at Rows x Columns only, and Pillow decoded the
    codestream at its own size: ~340 MiB resident for 36 Mpx, past a 2 Mpx cap."""
    from pydicom.uid import JPEGBaseline8Bit as baseline

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 150)).save(buf, "JPEG", quality=10)
    ds = dicom_dataset(np.zeros((16, 16, 3), np.uint8), "RGB")
    ds.file_meta.TransferSyntaxUID = baseline
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    return _dicom_bytes(ds)


DEFLATE_BOMB = _deflate_bomb()
JPEG_IN_DICOM_BOMB = _jpeg_in_dicom_bomb()
# An unknown VR ("U\0") on the transfer syntax element (found by a longer run, in the first
# version of the deflate check): pydicom converts values lazily and raised NotImplementedError on
# first access, outside the code that turned errors into skips.
UNKNOWN_VR = SEEDS["dicom-u16"][0].replace(b"\x02\x00\x10\x00UI", b"\x02\x00\x10\x00U\x00", 1)
# A PNG whose IDAT chunk claims 2 GiB (found by the 3,500-example run): Pillow skips the rest of
# the chunk with read(length), which reserved 2 GiB (MemoryError under RLIMIT_AS / `ulimit -v`).
IDAT_LENGTH_LIE = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x18\x00\x00\x00\x14\x10\x00\x00\x00\x00"
                   b"\xe2N~\x1c\x7f\xff\xff\xffIDATx\x9ccd```%\x05210\x93\x06G5\x8cj\x18\xd5@O\r\x00\xb2o"
                   b"\x05\xf3^\x83\xce\x12\x00\x00\x00\x00IEND\xaeB`\x82")
# A 4-byte element length of ~1 GiB right after "DICM": pydicom called read(length) on the file,
# which reserves that much before reading (MemoryError under RLIMIT_AS / `ulimit -v`).
HUGE_ELEMENT_LENGTH = b"\0" * 7 + b"A"


def test_regression_files_are_refused_with_a_reason(tmp_path):
    for name, data, why in (("deflate-bomb.dcm", DEFLATE_BOMB, "inflates to over"),
                            ("jpeg-bomb.dcm", JPEG_IN_DICOM_BOMB, "6000x6000 px exceeds pixel cap"),
                            ("length.dcm", b"\0" * 128 + b"DICM" + HUGE_ELEMENT_LENGTH, "unreadable DICOM")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(SkipError, match=why):
            run_bounded(lambda: read_grey(path, LIMITS))


def test_every_seed_decodes(tmp_path):
    """Mutations start from files that really decode, through every reader branch."""
    for name, (data, suffix) in SEEDS.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        img = run_bounded(lambda: load_image(path, PRE, LIMITS)).value
        assert img.shape == (PRE.size, PRE.size) and img.dtype == np.uint8, name
        assert img.max() > 0, name


# --------------------------------------------------------------------------- structure-aware fields


@dataclass(frozen=True)
class Field:
    """A header field worth overwriting: [offset, offset+size); ``crc`` = PNG chunk (start, end)
    whose CRC (stored at end..end+4) is recomputed afterwards when the mutation asks for it."""

    offset: int
    size: int
    crc: tuple[int, int] | None = None


def png_fields(data: bytes) -> list[Field]:
    """Chunk lengths, every IHDR field (width, height, depth, colour type...), first data bytes."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        crc = (pos + 4, end)
        out.append(Field(pos, 4))
        if data[pos + 4:pos + 8] == b"IHDR":
            out += [Field(pos + 8 + off, size, crc) for off, size in ((0, 4), (4, 4), (8, 1), (9, 1), (10, 1),
                                                                    (11, 1), (12, 1))]
        elif length:
            out.append(Field(pos + 8, min(length, 4), crc))
        pos = end + 4
    return out


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_fields(data: bytes) -> list[Field]:
    """Segment lengths; SOF precision, height, width, components and their sampling/tables;
    SOS component count and spectral selection; the first bytes of DQT/DHT/DRI."""
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        out.append(Field(pos + 2, 2))
        body = pos + 4
        if marker in _SOF and body + 6 <= len(data):
            out += [Field(body, 1), Field(body + 1, 2), Field(body + 3, 2), Field(body + 5, 1)]
            for i in range(data[body + 5]):
                if body + 6 + 3 * i + 3 <= len(data):
                    out += [Field(body + 6 + 3 * i + 1, 1), Field(body + 6 + 3 * i + 2, 1)]
        elif marker == 0xDA and body + 1 <= len(data):
            n = data[body]
            out.append(Field(body, 1))
            tail = body + 1 + 2 * n
            if tail + 3 <= len(data):
                out += [Field(tail, 1), Field(tail + 1, 1), Field(tail + 2, 1)]
            break
        elif marker in (0xC4, 0xDB, 0xDD) and body + 2 <= len(data):
            out += [Field(body, 1), Field(body + 1, 1)]
        pos += 2 + length
    return out


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def dicom_fields(data: bytes) -> list[Field]:
    """Every element's length field and the first bytes of its value (Rows, Columns,
    NumberOfFrames, BitsAllocated, the transfer syntax UID...), for explicit VR little endian."""
    out, pos = [], 132
    if data[128:132] != b"DICM":
        return out
    while pos + 8 <= len(data):
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                break
            length, header = int.from_bytes(data[pos + 8:pos + 12], "little"), 12
            out.append(Field(pos + 8, 4))
        elif vr.isalpha() and vr.isupper():
            length, header = int.from_bytes(data[pos + 6:pos + 8], "little"), 8
            out.append(Field(pos + 6, 2))
        else:
            break  # implicit VR / big endian / deflated: the generic mutations cover those
        if length == 0xFFFFFFFF:  # encapsulated pixel data: items follow
            out.append(Field(pos + header + 4, 4))  # the first item's length
            break
        if length:
            out.append(Field(pos + header, min(length, 8)))
        pos += header + length
    return out


def fields_of(data: bytes) -> list[Field]:
    if data.startswith(b"\x89PNG"):
        return png_fields(data)
    if data.startswith(b"\xff\xd8"):
        return jpeg_fields(data)
    return dicom_fields(data)


# --------------------------------------------------------------------------- mutations

INTERESTING = (0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 64, 127, 128, 255, 256, 1023, 1024, 4095, 4096,
               32767, 32768, 65535, 65536, 100_000, 2**24, 2**31 - 1, 2**31, 2**32 - 1)
NUMBER_TEXT = (b"0", b"1", b"-1", b"99", b"4", b"5", b"65535", b"99999999", b"1e9", b"nan", b"inf",
               b"-0", b"2.5", b" ", b"")


def _int_bytes(value: int, size: int, big: bool) -> bytes:
    return (value % (1 << (8 * size))).to_bytes(size, "big" if big else "little")


@st.composite
def mutated_files(draw) -> tuple[bytes, str]:
    """A seed with 1-4 mutations: bit flips, byte sets, inserts, deletes, truncation, header-field
    overwrites (huge width/height/frames, odd depths), int overwrites anywhere, duplication and
    splicing with another seed."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data, suffix = bytearray(SEEDS[name][0]), SEEDS[name][1]
    if draw(st.integers(0, 9)) == 0:
        suffix = draw(st.sampled_from(SUFFIXES))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate", "field", "field", "field",
                                   "number", "int", "duplicate", "splice")))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[at:]
        elif op in ("field", "number"):
            fields = fields_of(bytes(data))
            if not fields:
                continue
            f = draw(st.sampled_from(fields))
            if op == "number":
                text = draw(st.sampled_from(NUMBER_TEXT)).ljust(f.size)[:f.size]
                data[f.offset:f.offset + f.size] = text
            else:
                value = draw(st.sampled_from(INTERESTING) | st.integers(0, 2**32 - 1))
                data[f.offset:f.offset + f.size] = _int_bytes(value, f.size, big=not _is_dicom(data))
            if f.crc and draw(st.booleans()):
                start, end = f.crc
                data[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(data[start:end])))
        elif op == "int":
            size = draw(st.sampled_from((1, 2, 4)))
            value = draw(st.sampled_from(INTERESTING))
            data[at:at + size] = _int_bytes(value, size, big=draw(st.booleans()))
        elif op == "duplicate":
            n = draw(st.integers(1, 256))
            data[at:at] = data[at:at + n]
        else:  # splice: our prefix, another seed's suffix
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))][0]
            data = data[:at] + other[draw(st.integers(0, len(other) - 1)):]
    return bytes(data), suffix


def _is_dicom(data: bytes | bytearray) -> bool:
    return data[128:132] == b"DICM"


# --------------------------------------------------------------------------- decoding oracle


def _decode_all(path: Path):
    """read_grey, decode_scaled and load_image on one file: an array or the SkipError of each."""
    out = []
    for fn in (lambda: read_grey(path, LIMITS), lambda: decode_scaled(path, PRE, LIMITS),
               lambda: load_image(path, PRE, LIMITS)):
        try:
            out.append(fn())
        except SkipError as e:
            out.append(e)
    return out


def check_decodes_or_skips(data: bytes, suffix: str, folder: Path) -> None:
    path = folder / f"case{suffix}"
    path.write_bytes(data)
    grey, scaled, square = run_bounded(lambda: _decode_all(path)).value
    for result in (grey, scaled, square):
        if isinstance(result, SkipError):
            reason = str(result)
            assert reason.strip(), "a SkipError must give a reason"
            assert not _MEMORY_WORDS.search(reason), f"memory blow-up turned into a skip: {reason}"
    if isinstance(grey, SkipError):
        assert isinstance(scaled, SkipError) and isinstance(square, SkipError), "the entry points disagree"
        return
    assert isinstance(grey, np.ndarray) and grey.dtype == np.float32 and grey.ndim == 2, (grey.dtype, grey.shape)
    assert grey.size <= LIMITS.pixel_cap, f"{grey.shape} is over the pixel cap"
    if grey.size == 0:
        assert isinstance(scaled, SkipError) and isinstance(square, SkipError)
        return
    assert isinstance(scaled, np.ndarray) and scaled.dtype == np.uint8 and scaled.shape == grey.shape
    assert isinstance(square, np.ndarray) and square.dtype == np.uint8 and square.shape == (PRE.size, PRE.size)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(case=mutated_files())
@example(case=(DEFLATE_BOMB, ".dcm"))
@example(case=(JPEG_IN_DICOM_BOMB, ".dcm"))
@example(case=(UNKNOWN_VR, ".dcm"))
@example(case=(IDAT_LENGTH_LIE, ".png"))
def test_mutated_image_files(case, fuzz_dir):
    check_decodes_or_skips(*case, fuzz_dir)


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from(SUFFIXES), dicm=st.booleans())
@example(data=HUGE_ELEMENT_LENGTH, suffix=".png", dicm=True)
def test_random_bytes(data, suffix, dicm, fuzz_dir):
    """Noise, optionally behind a DICOM preamble so the DICOM parser gets to see it."""
    if dicm:
        data = b"\0" * 128 + b"DICM" + data
    check_decodes_or_skips(data, suffix, fuzz_dir)


# DICOM header attributes worth lying about, with values pydicom will still write.
_DICOM_ATTRS = {
    "Rows": st.sampled_from((0, 1, 19, 20, 21, 255, 4096, 65535)),
    "Columns": st.sampled_from((0, 1, 23, 24, 25, 255, 4096, 65535)),
    "NumberOfFrames": st.sampled_from(("0", "1", "2", "3", "4", "5", "-1", "99999999", "2147483648")),
    "BitsAllocated": st.sampled_from((0, 1, 7, 8, 12, 16, 24, 32, 64, 65535)),
    "BitsStored": st.sampled_from((0, 1, 8, 12, 16, 17, 32, 65535)),
    "HighBit": st.sampled_from((0, 7, 11, 15, 31, 65535)),
    "SamplesPerPixel": st.sampled_from((0, 1, 2, 3, 4, 65535)),
    "PixelRepresentation": st.sampled_from((0, 1, 2)),
    "PlanarConfiguration": st.sampled_from((0, 1, 2)),
    "PhotometricInterpretation": st.sampled_from(("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR",
                                                  "YBR_FULL", "YBR_FULL_422", "HSV", "")),
    "RescaleSlope": st.sampled_from(("0", "-1", "1e308", "nan", "inf", "1")),
    "RescaleIntercept": st.sampled_from(("0", "-1e308", "nan", "100000")),
    "WindowCenter": st.sampled_from(("0", "-1e30", "nan", "40", "1e308")),
    "WindowWidth": st.sampled_from(("0", "1", "-5", "nan", "1e-30", "1e308")),
    "VOILUTFunction": st.sampled_from(("LINEAR", "SIGMOID", "LINEAR_EXACT", "BOGUS")),
    "RedPaletteColorLookupTableDescriptor": st.lists(st.sampled_from((0, 1, 8, 16, 255, 256, 65535)),
                                                     min_size=3, max_size=3),
}


@st.composite
def dicom_header_cases(draw) -> tuple[bytes, str]:
    """A seed DICOM re-written with 1-4 header attributes set to odd or huge values."""
    from pydicom import dcmread

    name = draw(st.sampled_from(sorted(n for n in SEEDS if n.startswith("dicom"))))
    ds = dcmread(io.BytesIO(SEEDS[name][0]))
    for attr in draw(st.lists(st.sampled_from(sorted(_DICOM_ATTRS)), min_size=1, max_size=4, unique=True)):
        setattr(ds, attr, draw(_DICOM_ATTRS[attr]))
    try:
        data = _dicom_bytes(ds)
    except Exception:  # noqa: BLE001 - pydicom refuses to write some combinations; nothing to test
        data = SEEDS[name][0]
    return data, ".dcm"


@FUZZ
@given(case=dicom_header_cases())
def test_dicom_header_lies(case, fuzz_dir):
    check_decodes_or_skips(*case, fuzz_dir)


# --------------------------------------------------------------------------- CSV manifests

_ROW_LIMIT = 200
_CELL = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("manifest")
    (folder / "sub").mkdir()
    for name in ("ok.png", "sub/ok2.png"):
        (folder / name).write_bytes(SEEDS["png-L"][0])
    return folder


def _read_manifest_bounded(path: Path, limit: int):
    def go():
        skips = SkipLog()
        try:
            return read_manifest(path, skips, ReaderLimits(max_csv_row_chars=limit)), skips
        except DataError as err:
            assert str(err).startswith(str(path)), f"a DataError must name the file: {err}"
            return err, skips
    return run_bounded(go).value


def _check_manifest_outcome(records, skips: SkipLog, path: Path) -> None:
    for item in skips.items:
        assert isinstance(item.path, str) and item.reason.strip()
    if isinstance(records, DataError):
        return
    for rec in records:
        assert isinstance(rec, Record) and Path(rec.path).is_file()


@FUZZ
@given(header=st.sampled_from(("path,body_part,abnormal", "PATH, Body_Part ,abnormal,patient,study,split",
                               "abnormal,path,body_part", "path,body_part", "")),
       body=st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400),
                      st.text(alphabet=',"\r\n\0 \tok.pngWRIST01\ufeff\u2028', max_size=400),
                      st.binary(max_size=400)),
       limit=st.sampled_from((1, 8, 64, _ROW_LIMIT, 65_536)))
def test_random_manifest_text(header, body, limit, manifest_dir):
    """Any text (or bytes) after a header: records and skipped rows, or a DataError."""
    path = manifest_dir / "m.csv"
    raw = body if isinstance(body, bytes) else body.encode("utf-8")
    path.write_bytes(header.encode() + b"\n" + raw)
    records, skips = _read_manifest_bounded(path, limit)
    _check_manifest_outcome(records, skips, path)


_PARTS = ("WRIST", "wrist", " Hand ", "XR_ELBOW", "KNEE", "")
_ABNORMAL = ("0", "1", "true", "No", "positive", "", "maybe")
_PATHS = ("ok.png", "sub/ok2.png", "gone.png", "", " ", "sub", "../m.csv")


@st.composite
def manifest_rows(draw):
    """A header (all six columns, shuffled) and rows of plausible and implausible cells."""
    columns = draw(st.permutations(["path", "body_part", "abnormal", "patient", "study", "split"]))
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        cells = {"path": draw(st.sampled_from(_PATHS) | _CELL),
                 "body_part": draw(st.sampled_from(_PARTS) | _CELL),
                 "abnormal": draw(st.sampled_from(_ABNORMAL) | _CELL)}
        row = [cells.get(c, draw(_CELL)) for c in columns]
        shape = draw(st.sampled_from(("ok", "ok", "ok", "short", "long", "blank", "huge")))
        if shape == "short":
            row = row[:draw(st.integers(0, len(row) - 1))]
        elif shape == "long":
            row = row + [draw(_CELL)]
        elif shape == "blank":
            row = [" "] * len(row)
        elif shape == "huge":
            row[0] = "x" * draw(st.integers(_ROW_LIMIT - 10, _ROW_LIMIT + 10))
        rows.append([cell.replace("\r", " ").replace("\n", " ").replace("\0", " ") for cell in row])
    ending = draw(st.sampled_from(("\n", "\r\n", "\r")))
    return columns, rows, ending


def _expected(columns, row, line: str, folder: Path) -> str:
    """What the reader must do with one row: 'blank', 'record' or 'skip'."""
    if not any(cell.strip() for cell in row):
        return "blank"
    if len(line) > _ROW_LIMIT or len(row) != len(columns):
        return "skip"
    cells = dict(zip(columns, row))
    part = cells["body_part"].strip().upper().removeprefix("XR_")
    if part and part not in ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST"):
        return "skip"
    value = cells["abnormal"].strip().lower()
    if value and value not in {"1", "true", "yes", "positive", "abnormal", "y", "t",
                               "0", "false", "no", "negative", "normal", "n", "f"}:
        return "skip"
    raw = cells["path"].strip()
    if not raw or not (folder / raw).is_file():
        return "skip"
    return "record"


@FUZZ
@given(case=manifest_rows())
# A row of exactly _ROW_LIMIT characters with CRLF endings: it was skipped as too long (with "\n"
# it was kept), and the "\n" left behind shifted every later line number by one.
@example(case=(["path", "body_part", "abnormal", "patient", "study", "split"],
               [["ok.png", "WRIST", "0", "p" * (_ROW_LIMIT - 17), "", ""],
                ["ok.png", "WRIST", "0", "p" * (_ROW_LIMIT - 16), "", ""], ["gone.png", "HAND", "1", "", "", ""]],
               "\r\n"))
def test_random_manifest_rows(case, manifest_dir):
    """Every non-blank row becomes exactly one record or one skip naming ``file:line`` (or the
    listed path); a row is cut at ``max_csv_row_chars`` characters whatever its line ending."""
    columns, rows, ending = case
    path = manifest_dir / "rows.csv"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=ending)
    writer.writerow(columns)
    lines = []
    for row in rows:
        start = buf.tell()
        writer.writerow(row)
        lines.append(buf.getvalue()[start:].removesuffix(ending))
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    records, skips = _read_manifest_bounded(path, _ROW_LIMIT)
    assert not isinstance(records, DataError), records
    expected = [_expected(columns, row, line, manifest_dir) for row, line in zip(rows, lines)]
    assert len(records) == expected.count("record"), (expected, [s.reason for s in skips.items])
    assert len(skips) == expected.count("skip"), (expected, [s.reason for s in skips.items])
    skip_lines = {i + 2 for i, what in enumerate(expected) if what == "skip"}  # line 1 is the header
    for item in skips.items:
        where = re.search(r"rows\.csv:(\d+)", f"{item.path} {item.reason}")
        assert where and int(where.group(1)) in skip_lines, (item, expected)


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory) -> Path:
    """One MURA-v1.1 root for every example (each rewrites the two CSVs)."""
    root = tmp_path_factory.mktemp("mura") / "MURA-v1.1"
    image = root / "train/XR_WRIST/patient00001/study1_positive/image1.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(SEEDS["png-L"][0])
    return root


@FUZZ
@given(paths=st.lists(st.sampled_from(("MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/image1.png",
                                       "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/gone.png",
                                       "MURA-v1.1/train/XR_KNEE/patient1/study1_positive/image1.png",
                                       "", ",", '"', "\0")) | _CELL, max_size=8),
       studies=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200),
       noise=st.binary(max_size=64))
def test_random_mura_csvs(paths, studies, noise, mura_root):
    """MURA-v1.1's two header-less CSVs with random rows: records, skips or a DataError."""
    root = mura_root
    (root / "train_image_paths.csv").write_bytes("\n".join(paths).encode("utf-8", "surrogatepass") + noise)
    (root / "train_labeled_studies.csv").write_text(studies, encoding="utf-8")

    def go():
        skips = SkipLog()
        try:
            return read_mura_csv(root, skips), skips
        except DataError as err:
            return err, skips
    records, skips = run_bounded(go).value
    _check_manifest_outcome(records, skips, root)

"""Image decoding: one file on disk -> one grey uint8 (size, size) array.

The chain is ``read_grey`` (float32 raw intensities) -> ``scale_percentiles`` (uint8) ->
``fit_to_square`` (uint8, size x size); ``load_image`` runs all three.

Every problem that is about the *file* (missing, empty, truncated, not an image, too big,
undecodable DICOM) is raised as :class:`~bonecluster.data.records.SkipError` with a short
reason, so one bad file is logged and skipped instead of stopping a run. Bad *arguments*
(a programming error) raise ValueError.

Hostile input: :class:`Limits` bounds what one file may cost. The byte size is checked before
reading, the pixel count before any pixel is decoded (for DICOM also the size the embedded
JPEG/JPEG 2000 codestream declares, which may differ from Rows x Columns), the frame count
before decoding, and a deflated DICOM's inflated size while inflating. The decoders never get
more bytes than the file has for one read, so a corrupt length field cannot reserve gigabytes.
tests/unit/test_fuzz_readers.py fuzzes these entry points with mutated files.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import (JPEG2000, DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, RLELossless)

try:  # to find where a deflated DICOM's compressed dataset starts (pydicom 2.x and 3.x)
    from pydicom.filereader import _read_file_meta_info, read_preamble
except ImportError:  # pragma: no cover - a later pydicom; deflated files are then refused
    _read_file_meta_info = read_preamble = None

from bonecluster.data.records import SkipError

__all__ = [
    "IMAGE_SUFFIXES",
    "Limits",
    "Preprocess",
    "deskew_film",
    "fit_to_square",
    "is_dicom",
    "load_image",
    "read_grey",
    "scale_percentiles",
]

DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
) | DICOM_SUFFIXES

FITS: tuple[str, ...] = ("squash", "letterbox", "deskew", "crop")

# "deskew" and "crop": pixels above this grey level (after percentile scaling) belong to the film; the
# black around a film that was rotated or photographed at an angle stays below it.
DESKEW_BACKGROUND = 8
# The straightening angle is measured on a copy whose long side is at most this many pixels.
DESKEW_WORK_SIZE = 256
# fit="deskew" straightens a copy whose long side is at most this many times the output size.
DESKEW_OVERSAMPLE = 4

# Bumped when decoding changes what pixels come out, so cached arrays keyed by
# Preprocess.key() are not reused across incompatible versions.
DECODE_VERSION = 1

# Only these PIL plugins may open a file. Besides giving a clear "not an image" for
# anything else, it keeps exotic plugins (EPS runs Ghostscript, etc.) away from
# untrusted input. (Multi-picture camera JPEGs, MPO, are opened by the JPEG entry.)
_PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "BMP")

# Magic numbers, only to tell "corrupt PNG" from "not an image" when PIL gives up early.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)

# Modes whose pixels are already one grey channel; np.asarray keeps their full depth.
_GREY_MODES = frozenset({"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})

# Modes PIL converts to RGB; luminance is taken from that.
_COLOUR_MODES = frozenset(
    {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}
)

# ITU-R BT.601 luma weights, the same ones PIL's convert("L") uses, but applied in
# float so no 8-bit rounding happens before percentile scaling.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_HEAD_BYTES = 132  # 128-byte DICOM preamble + "DICM"


@dataclass(frozen=True)
class Limits:
    """Guards against files that would exhaust memory or time; over a limit is a SkipError.

    ``pixel_cap``: width*height above this is refused before pixels are decoded
    (decompression-bomb guard; for DICOM both Rows x Columns and the size an embedded
    JPEG/JPEG 2000 codestream declares). ``max_frames``: DICOMs with more frames are refused;
    multi-frame files below it use their first frame. ``max_file_bytes``: bigger files
    are refused without being read, and a deflated DICOM whose dataset inflates beyond it
    is refused while inflating. The CLI flags ``--max-pixels``, ``--max-frames`` and
    ``--max-file-mb`` set them (config ``data.pixel_cap``, ``data.max_frames``,
    ``data.max_file_mb``).
    """

    pixel_cap: int = 64_000_000  # for PIL formats, PIL's Image.MAX_IMAGE_PIXELS also applies
    max_frames: int = 16
    max_file_bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        for name in ("pixel_cap", "max_frames", "max_file_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes a network input: uint8 (size, size).

    ``fit`` is "squash" (resize ignoring aspect), "letterbox" (keep aspect, pad with 0),
    "deskew" (straighten a tilted film, crop it to its content, then letterbox; see
    :func:`deskew_film`) or "crop" (cut to the film's bounding box, then squash; see
    :func:`crop_to_film`). ``pct_low``/``pct_high`` are the percentiles mapped to 0 and 255.
    """

    size: int = 128
    fit: str = "squash"
    pct_low: float = 0.5
    pct_high: float = 99.5

    def __post_init__(self) -> None:
        _check_size(self.size)
        _check_fit(self.fit)
        _check_percentiles(self.pct_low, self.pct_high)

    def key(self) -> str:
        """A short stable string naming every field, e.g. 'v1-s128-squash-p0.5-99.5'.

        Floats use repr so distinct values never collide (1 and 1.0 give the same key,
        as they give the same pixels).
        """
        low, high = repr(float(self.pct_low)), repr(float(self.pct_high))
        return f"v{DECODE_VERSION}-s{self.size}-{self.fit}-p{low}-{high}"


# --------------------------------------------------------------------------- checks


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def _check_fit(fit: str) -> None:
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")


def _check_percentiles(pct_low: float, pct_high: float) -> None:
    if not 0.0 <= pct_low < pct_high <= 100.0:
        raise ValueError(
            f"need 0 <= pct_low < pct_high <= 100, got pct_low={pct_low!r}, pct_high={pct_high!r}"
        )


def _check_pixel_count(width: int, height: int, limits: Limits) -> None:
    """SkipError when width*height exceeds the cap; call before any pixel is decoded."""
    if width * height > limits.pixel_cap:
        raise SkipError(
            f"image too large: {width}x{height} px exceeds pixel cap {limits.pixel_cap} "
            "(decompression-bomb guard)"
        )


# --------------------------------------------------------------------------- files


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a .dcm/.dicom name or a file with 'DICM' at byte offset 128.

    Never raises: an unreadable file is judged by its name only.
    """
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return _has_dicm(fh.read(_HEAD_BYTES))
    except OSError:
        return False


def _has_dicm(head: bytes) -> bool:
    return head[128:132] == b"DICM"


def _sniff(head: bytes) -> str | None:
    """Format named by the file's magic number, or None."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def _stat_file(path: str | os.PathLike, limits: Limits) -> None:
    """SkipError for a path that is missing, not a regular file, empty or too big."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SkipError("file not found") from None
    except OSError as e:
        raise SkipError(f"cannot read file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SkipError("not a regular file")
    if st.st_size == 0:
        raise SkipError("empty file (0 bytes)")
    if st.st_size > limits.max_file_bytes:
        raise SkipError(
            f"file too large: {st.st_size} bytes exceeds the file size limit of "
            f"{limits.max_file_bytes} bytes"
        )


class _ClampedReader:
    """A binary file whose ``read(n)`` never asks for more than what is left in the file.

    The decoders trust length fields: pydicom reads each element with ``read(length)``, and
    Pillow skips the rest of a PNG IDAT chunk with ``read(length)``. A buffered file reserves
    ``length`` bytes before reading, so one corrupt 4-byte length asked for up to 4 GiB
    (MemoryError under ``ulimit -v`` or strict overcommit). Everything else goes to the file.
    """

    def __init__(self, fh):
        self._fh = fh
        self._size = os.fstat(fh.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._fh.read()
        return self._fh.read(min(size, max(0, self._size - self._fh.tell())))

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


def read_grey(path: str | os.PathLike, limits: Limits = Limits()) -> np.ndarray:
    """Decode one image file to float32 (H, W) raw intensities, one grey channel.

    16-bit PNG/TIFF keep their full range; DICOM comes out after the modality LUT,
    the VOI LUT/window (when the file has one) and MONOCHROME1 inversion, so bone
    is bright. Raises SkipError for any file that cannot be used.
    """
    _stat_file(path, limits)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
            fh.seek(0)
            src = _ClampedReader(fh)
            if Path(path).suffix.lower() in DICOM_SUFFIXES or _has_dicm(head):
                return _read_dicom(src, limits)
            return _read_pil(src, head, limits)
    except OSError as e:
        # Only open/read/seek of the file itself get here; decoders' own OSErrors
        # are converted inside _read_pil/_read_dicom.
        raise SkipError(f"cannot read file: {e.strerror or e}") from None


# --------------------------------------------------------------------------- PIL


def _read_pil(fh, head: bytes, limits: Limits) -> np.ndarray:
    """PNG/JPEG/TIFF/BMP from an open binary file -> float32 (H, W)."""
    with _open_pil(fh, head, limits) as img:
        try:
            # load() inside the try: truncated data fails here (PIL reads lazily).
            # LOAD_TRUNCATED_IMAGES is left at its default False, so it does fail.
            img.load()
            upright = _exif_upright(img)
        except Exception as e:  # any decoder failure is the file's fault
            raise SkipError(f"truncated or corrupt image: {_why(e)}") from None
        return _pil_to_grey(upright)


def _open_pil(fh, head: bytes, limits: Limits) -> Image.Image:
    """Image.open plus the size check, before any pixel data is decoded."""
    try:
        # PIL's own bomb guard warns (and raises at 2x) against Image.MAX_IMAGE_PIXELS;
        # turn the warning into an error for this call only instead of changing globals.
        # (catch_warnings is process-wide, not thread-safe; loader workers are processes.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fh, formats=_PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipError(_pil_bomb_reason(e, limits)) from None
    except UnidentifiedImageError:
        fmt = _sniff(head)
        if fmt is None:
            raise SkipError("not an image (unrecognised format)") from None
        raise SkipError(f"truncated or corrupt image: unreadable {fmt} header") from None
    except Exception as e:
        raise SkipError(f"truncated or corrupt image: {_why(e)}") from None
    width, height = img.size
    try:
        _check_pixel_count(width, height, limits)
    except SkipError:
        img.close()
        raise
    return img


def _pil_bomb_reason(e: Exception, limits: Limits) -> str:
    """Reason for PIL's own bomb guard, which fires inside Image.open, before our check.

    PIL puts the pixel count (not the width and height) in its message only.
    """
    found = re.search(r"\((\d+) pixels\)", str(e))
    count = f"{found.group(1)} px" if found else "size"
    if found and int(found.group(1)) > limits.pixel_cap:
        limit = f"pixel cap {limits.pixel_cap}"
    else:
        limit = f"PIL limit {Image.MAX_IMAGE_PIXELS}"
    return f"image too large: {count} exceeds {limit} (decompression-bomb guard)"


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone photos of films/screens carry one)."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def _pil_to_grey(img: Image.Image) -> np.ndarray:
    """A loaded PIL image of any supported mode -> float32 (H, W).

    Grey modes keep their full depth (I;16 stays 0..65535); colour becomes BT.601
    luminance computed in float; RGBA/LA drop alpha; P goes through its palette.
    """
    mode = img.mode
    if mode in _GREY_MODES:
        return np.asarray(img).astype(np.float32)
    if mode in ("LA", "La"):
        return np.asarray(img.getchannel("L")).astype(np.float32)
    if mode not in _COLOUR_MODES:  # e.g. signed 16-bit TIFF (I;16S)
        raise SkipError(f"unsupported image mode {mode}")
    # P -> RGBA (not RGB) because PIL warns when a palette with transparency bytes
    # is converted straight to RGB; alpha is dropped below either way.
    rgb = img.convert("RGBA" if mode in ("P", "PA") else "RGB")
    arr = np.asarray(rgb)[..., :3].astype(np.float32)
    return arr @ _LUMA


def _why(e: BaseException) -> str:
    """Short text for an exception: its message, or its type name if it has none."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


# --------------------------------------------------------------------------- DICOM


def _read_dicom(fh, limits: Limits) -> np.ndarray:
    """A DICOM file -> float32 (H, W) after modality LUT, VOI LUT/window, MONOCHROME1 flip."""
    try:
        _check_deflated_size(fh, limits)
        ds = _dcmread(fh)
        _check_dicom_header(ds, limits)
        _check_encapsulated_size(ds, limits)
        arr = _dicom_first_frame(ds)
        return _dicom_to_grey(arr, ds)
    except SkipError:
        raise
    except Exception as e:  # noqa: BLE001
        # pydicom converts element values lazily, so a malformed element (an unknown VR, a bad
        # number) raises on first use, wherever that is; it is still the file's fault.
        raise SkipError(f"unreadable DICOM: {_why(e)}") from None


def _dcmread(fh) -> pydicom.Dataset:
    """Other pydicom errors become "unreadable DICOM" in :func:`_read_dicom`."""
    try:
        return pydicom.dcmread(fh, force=False)
    except InvalidDicomError as e:
        raise SkipError(f"unreadable DICOM: not a DICOM file ({_why(e)})") from None


def _check_deflated_size(fh, limits: Limits) -> None:
    """SkipError when a Deflated Explicit VR Little Endian dataset inflates past max_file_bytes.

    pydicom inflates the whole dataset with one zlib.decompress, so a small deflated file of
    zeros (a "zip bomb": about 1000:1) would otherwise expand into gigabytes before any other
    limit is looked at. Here the inflated bytes are only counted, 64 KiB at a time.
    Leaves ``fh`` at offset 0. Anything unparsable is left for pydicom to report.
    """
    try:
        if read_preamble is None:
            if DeflatedExplicitVRLittleEndian.encode() in fh.read(4096):
                raise SkipError("unsupported DICOM transfer syntax: deflated (with this pydicom version)")
            return
        try:
            read_preamble(fh, False)
            syntax = _read_file_meta_info(fh).get("TransferSyntaxUID")
        except Exception:  # noqa: BLE001 - pydicom says what is wrong when it reads the file
            return
        if syntax != DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = 0
        while not inflater.eof:  # bytes after the end of the stream are pydicom's to judge
            data = inflater.unconsumed_tail or fh.read(2**16)
            if not data:
                break
            try:
                inflated += len(inflater.decompress(data, 2**16))
            except zlib.error as e:
                raise SkipError(f"unreadable DICOM: corrupt deflated dataset ({_why(e)})") from None
            if inflated > limits.max_file_bytes:
                raise SkipError(
                    f"file too large: the deflated DICOM dataset inflates to over "
                    f"{limits.max_file_bytes} bytes, the file size limit"
                )
    finally:
        fh.seek(0)


def _dicom_int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    """An integer attribute, SkipError when missing (and no default) or malformed."""
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise SkipError(f"unreadable DICOM: missing {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SkipError(f"unreadable DICOM: bad {keyword} {value!r}") from None


def _check_dicom_header(ds: pydicom.Dataset, limits: Limits) -> None:
    """Refuse, before decoding pixels: no pixel data, too many frames, too many
    pixels, or a transfer syntax no installed plugin can decode."""
    # pydicom is lenient: a file cut inside its header, or noise after "DICM", reads
    # as an almost empty dataset. Without a transfer syntax nothing can be decoded.
    if not getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None):
        raise SkipError("unreadable DICOM: no transfer syntax (truncated or corrupt header)")
    if len(ds) == 0:
        raise SkipError("unreadable DICOM: no data elements after the file meta (truncated?)")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise SkipError("DICOM has no pixel data")
    frames = _dicom_int(ds, "NumberOfFrames", 1)
    if frames < 1:
        raise SkipError(f"unreadable DICOM: bad NumberOfFrames {frames}")
    if frames > limits.max_frames:
        raise SkipError(f"DICOM has {frames} frames, limit is {limits.max_frames}")
    rows, cols = _dicom_int(ds, "Rows"), _dicom_int(ds, "Columns")
    _check_pixel_count(cols, rows, limits)
    _check_transfer_syntax(ds)


# Transfer syntaxes whose frames pydicom hands to Pillow, which decodes a codestream at the size
# the codestream declares (not Rows x Columns).
_PILLOW_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000Lossless, JPEG2000})


def _check_encapsulated_size(ds: pydicom.Dataset, limits: Limits) -> None:
    """For compressed pixel data, the pixel cap also applies to the size frame 0's JPEG or
    JPEG 2000 codestream declares: Rows x Columns may say 16 x 16 while the codestream says
    60000 x 60000, and the decoder allocates what the codestream says."""
    uid = ds.file_meta.TransferSyntaxUID
    if not uid.is_encapsulated or uid == RLELossless:  # RLE output is bounded by Rows x Columns
        return
    try:
        frames = _dicom_int(ds, "NumberOfFrames", 1)
        frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(frame), formats=("JPEG", "JPEG2000")) as img:
                width, height = img.size
    except SkipError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipError(_pil_bomb_reason(e, limits)) from None
    except Exception as e:
        if uid in _PILLOW_SYNTAXES:
            raise SkipError(f"unreadable DICOM pixel data ({uid.name}): {_why(e)}") from None
        return  # a codestream only another plugin decodes (pylibjpeg/gdcm): it reports problems itself
    _check_pixel_count(width, height, limits)


def _check_transfer_syntax(ds: pydicom.Dataset) -> None:
    uid = ds.file_meta.TransferSyntaxUID
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:  # a UID pydicom has no decoder class for at all
        available = False
    if not available:
        # UID.name falls back to the UID itself for ones pydicom does not know.
        name = uid.name if uid.name != str(uid) else "unknown"
        raise SkipError(
            f"unsupported DICOM transfer syntax {uid} ({name}); "
            "install pylibjpeg/gdcm or convert"
        )


def _dicom_first_frame(ds: pydicom.Dataset) -> np.ndarray:
    """Decode only frame 0: (rows, cols) for grey, (rows, cols, 3) RGB for colour."""
    try:
        # raw=False: YBR colour comes back as RGB.
        arr = pydicom.pixels.pixel_array(ds, index=0, raw=False)
    except Exception as e:
        uid = ds.file_meta.TransferSyntaxUID
        where = uid.name
        if uid.is_compressed:
            # A plugin can exist yet lack a variant (Pillow has no 12-bit JPEG), so
            # say which plugins were tried: the file may be fine, the decoder not.
            where += ", tried " + "/".join(get_decoder(uid).available_plugins)
        raise SkipError(f"unreadable DICOM pixel data ({where}): {_why(e)}") from None
    return arr


def _dicom_to_grey(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Frame 0 -> float32 (H, W) as a reader would see it (bone bright)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2") and arr.ndim == 2:
        return _dicom_mono(arr, ds, invert=photometric == "MONOCHROME1")
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        return _dicom_palette(arr, ds)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        if arr.ndim == 3 and arr.shape[-1] == 3:  # pixel_array gave RGB
            return arr.astype(np.float32) @ _LUMA
    raise SkipError(
        f"unsupported DICOM photometric interpretation {photometric} "
        f"with pixel shape {arr.shape}"
    )


def _dicom_mono(arr: np.ndarray, ds: pydicom.Dataset, invert: bool) -> np.ndarray:
    """Modality LUT, then VOI LUT or window when present, then MONOCHROME1 flip."""
    try:
        arr = apply_modality_lut(arr, ds)
        # apply_voi_lut would also pass the array through untouched when neither is
        # present; checking here keeps that explicit.
        if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
            arr = apply_voi_lut(arr, ds, index=0)
    except Exception as e:  # malformed LUT / window values are the file's fault
        raise SkipError(f"unreadable DICOM LUT/window: {_why(e)}") from None
    arr = arr.astype(np.float32)
    if invert:
        # MONOCHROME1: low values are white. Reflect within the image's own range so
        # the values stay in the same interval and bone ends up bright.
        arr = (arr.max() + arr.min()) - arr
    return arr


def _dicom_palette(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """(H, W) palette indices -> float32 (H, W) luminance of the palette colours."""
    try:
        rgb = pydicom.pixels.apply_color_lut(arr, ds)
    except Exception as e:
        raise SkipError(f"unreadable DICOM palette: {_why(e)}") from None
    return rgb[..., :3].astype(np.float32) @ _LUMA


# --------------------------------------------------------------------------- pixels


def scale_percentiles(
    img: np.ndarray, pct_low: float = 0.5, pct_high: float = 99.5
) -> np.ndarray:
    """(H, W) any real dtype -> uint8 (H, W): pct_low maps to 0, pct_high to 255.

    Values outside are clipped. Robust to a few hot or dead pixels and to labels
    burnt into the corners, unlike min/max. A constant image gives all zeros;
    non-finite values are ignored for the percentiles and map to 0 (NaN) or clip (inf).
    """
    _check_percentiles(pct_low, pct_high)
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D (H, W) array, got shape {img.shape}")
    finite = np.isfinite(img)
    values = img if finite.all() else img[finite]
    if values.size == 0:
        return np.zeros(img.shape, dtype=np.uint8)
    low, high = np.percentile(values, [pct_low, pct_high])
    if not high > low:  # constant image (or constant between the percentiles)
        return np.zeros(img.shape, dtype=np.uint8)
    # float32 is plenty for 16-bit data and halves memory on large radiographs.
    out = (img.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def fit_to_square(img_u8: np.ndarray, size: int, fit: str = "squash") -> np.ndarray:
    """uint8 (H, W) -> uint8 (size, size).

    "squash" resizes to size x size, ignoring aspect. "letterbox" scales the longer
    side to ``size``, keeps the aspect, and centres the result on a zero background.
    "deskew" straightens and crops the film first (:func:`deskew_film`), then letterboxes.
    "crop" cuts the image to its film's bounding box (:func:`crop_to_film`), then squashes: the
    black canvas around a scanned or re-shared film no longer sets how large the anatomy is.

    Resampling is PIL BILINEAR for both directions. Pillow's resize is a true
    convolution whose support widens with the reduction factor, so BILINEAR is
    anti-aliased when downscaling (a triangle filter over the source area, slightly
    smoother than BOX's plain average) and still interpolates when upscaling, where
    BOX would give blocks. ``reducing_gap`` lets PIL first shrink by an integer factor
    with a box reduce: 3000x2500 -> 128x128 drops from ~7 ms to ~2 ms, and pixels move
    by at most 2 grey levels.
    """
    _check_size(size)
    _check_fit(fit)
    img_u8 = np.asarray(img_u8)
    if img_u8.ndim != 2 or img_u8.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W), got {img_u8.dtype} {img_u8.shape}")
    height, width = img_u8.shape
    if height == 0 or width == 0:
        raise ValueError(f"empty image {img_u8.shape}")
    if fit == "squash":
        return _resize(img_u8, size, size)
    if fit == "crop":
        return _resize(crop_to_film(img_u8), size, size)
    if fit == "deskew":
        # Rotating a 3000-px film costs ~90 ms; at 4x the output size it costs a few, and the
        # final resize to `size` cannot show the difference.
        if max(height, width) > DESKEW_OVERSAMPLE * size:
            img_u8 = _longest_side_to(img_u8, DESKEW_OVERSAMPLE * size)
        img_u8 = deskew_film(img_u8)
    fitted = _longest_side_to(img_u8, size)
    new_h, new_w = fitted.shape
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = fitted
    return out


def deskew_film(img_u8: np.ndarray, background: int = DESKEW_BACKGROUND) -> np.ndarray:
    """Straighten a tilted film and crop it to its content: uint8 (H, W) -> uint8 (H', W').

    Exported and re-shared radiographs are often rotated by a few degrees inside a black
    canvas (a quarter of the labelled fracture-parts films by more than 2 degrees), which a
    square network input then shows as a tilted rectangle. The film is the set of pixels above
    ``background``; the rectangle of least area around it (rotating calipers over its convex
    hull) gives the tilt, folded into [-45, 45] degrees so that a portrait film stays portrait.
    The image is rotated back by that angle and cropped to the film's bounding box. An image
    whose film fills the frame, or that has no film at all, comes back unchanged.
    """
    film = img_u8 > background
    if film.all() or film.sum() < 16:
        return img_u8
    angle = _film_tilt(img_u8, background)
    if abs(angle) > 0.25:   # under a quarter degree, rotating would only blur
        pil = Image.fromarray(img_u8).rotate(-angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0)
        img_u8 = np.asarray(pil, dtype=np.uint8)
    return crop_to_film(img_u8, background)


def crop_to_film(img_u8: np.ndarray, background: int = DESKEW_BACKGROUND) -> np.ndarray:
    """uint8 (H, W) -> the bounding box of its pixels above ``background`` (the film), uint8 (H', W').

    An image with fewer than 16 film pixels comes back unchanged (nothing to crop to).
    """
    film = img_u8 > background
    if film.sum() < 16:
        return img_u8
    rows, cols = np.flatnonzero(film.any(axis=1)), np.flatnonzero(film.any(axis=0))
    return np.ascontiguousarray(img_u8[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


def _film_tilt(img_u8: np.ndarray, background: int) -> float:
    """The film's tilt in degrees, in [-45, 45] (PIL's counter-clockwise sense): the angle of
    the least-area rectangle around the pixels above ``background``, on a small copy."""
    from scipy.spatial import ConvexHull, QhullError

    step = max(1, int(np.ceil(max(img_u8.shape) / DESKEW_WORK_SIZE)))
    ys, xs = np.nonzero(img_u8[::step, ::step] > background)
    points = np.stack([xs, -ys], axis=1).astype(np.float64)   # y up, so angles turn as PIL's do
    try:
        hull = points[ConvexHull(points).vertices]
    except (QhullError, ValueError):   # all points on a line, or too few
        return 0.0
    edges = np.roll(hull, -1, axis=0) - hull
    angles = np.arctan2(edges[:, 1], edges[:, 0])                    # (E,) one per hull edge
    cos, sin = np.cos(angles), np.sin(angles)
    along = hull @ np.stack([cos, sin])                              # (V, E): hull in each edge's frame
    across = hull @ np.stack([-sin, cos])
    areas = np.ptp(along, axis=0) * np.ptp(across, axis=0)
    tilt = np.degrees(angles[np.argmin(areas)]) % 90.0
    return float(tilt - 90.0 if tilt > 45.0 else tilt)


def _longest_side_to(img_u8: np.ndarray, longest: int) -> np.ndarray:
    """uint8 (H, W) resized so that its longer side is ``longest``, aspect kept (see _resize)."""
    height, width = img_u8.shape
    scale = longest / max(height, width)
    new_w = min(longest, max(1, round(width * scale)))
    new_h = min(longest, max(1, round(height * scale)))
    return _resize(img_u8, new_w, new_h)


def _resize(img_u8: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W) -> uint8 (height, width) with PIL bilinear (see fit_to_square)."""
    if img_u8.shape == (height, width):
        return img_u8.copy()
    pil = Image.fromarray(img_u8)
    resized = pil.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8).copy()


def load_image(
    path: str | os.PathLike, pre: Preprocess = Preprocess(), limits: Limits = Limits()
) -> np.ndarray:
    """The full chain for one file -> uint8 (pre.size, pre.size). Raises SkipError."""
    return fit_to_square(decode_scaled(path, pre, limits), pre.size, pre.fit)


def decode_scaled(path: str | os.PathLike, pre: Preprocess = Preprocess(), limits: Limits = Limits()) -> np.ndarray:
    """Decode and scale intensities by ``pre``'s percentiles, before any resizing (the viewer
    makes two sizes from it). Raises SkipError."""
    grey = read_grey(path, limits)
    if grey.size == 0:
        raise SkipError("image has no pixels")
    return scale_percentiles(grey, pre.pct_low, pre.pct_high)

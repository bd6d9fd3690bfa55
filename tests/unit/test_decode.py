"""Decoding of good files: every format/mode/bit depth, DICOM LUTs, scaling and fitting."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless

from bonecluster.data.decode import (
    IMAGE_SUFFIXES,
    Limits,
    Preprocess,
    crop_to_film,
    deskew_film,
    fit_to_square,
    is_dicom,
    load_image,
    read_grey,
    scale_percentiles,
)
from tests.unit.dicom_utils import dicom_dataset

# A gradient with a bright square: not constant, not symmetric, so flips would show.
GRADIENT = (np.arange(24 * 32).reshape(24, 32) % 200 + 20).astype(np.uint8)
GRADIENT[2:8, 3:12] = 250


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    syntax: str = ExplicitVRLittleEndian,
    encoded: bytes | None = None,
    **attrs,
) -> Path:
    """Write pixels as a DX DICOM file.

    ``pixels``: uint8/uint16 (rows, cols), (frames, rows, cols) or (rows, cols, 3) for
    RGB. ``encoded``: already-encapsulated pixel data for a compressed ``syntax``;
    without it, RLE is encoded by pydicom itself.
    """
    ds = dicom_dataset(pixels, photometric, **attrs)
    meta = ds.file_meta
    if encoded is not None:
        meta.TransferSyntaxUID = syntax
        ds.PixelData = encoded
        ds["PixelData"].VR = "OB"
    elif syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def save_pil(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


# --------------------------------------------------------------------------- PIL formats


def test_grey_png_8bit(tmp_path):
    path = save_pil(tmp_path / "g.png", Image.fromarray(GRADIENT))
    grey = read_grey(path)
    assert grey.dtype == np.float32 and grey.shape == (24, 32)
    np.testing.assert_array_equal(grey, GRADIENT)


def test_png_16bit_keeps_precision(tmp_path):
    values = (np.arange(24 * 32).reshape(24, 32) * 70 + 300).astype(np.uint16)  # up to ~54000
    path = save_pil(tmp_path / "g16.png", Image.fromarray(values))
    grey = read_grey(path)
    assert grey.dtype == np.float32
    np.testing.assert_array_equal(grey, values)  # nothing squashed to 8 bit
    assert grey.max() > 255
    scaled = scale_percentiles(grey, 0, 100)
    order = np.argsort(values, axis=None, kind="stable")
    assert np.all(np.diff(scaled.ravel()[order].astype(int)) >= 0)  # monotonic with input
    assert scaled.min() == 0 and scaled.max() == 255


def test_tiff_16bit_and_bmp(tmp_path):
    values = (GRADIENT.astype(np.uint16) * 200).astype(np.uint16)
    tif = save_pil(tmp_path / "a.tif", Image.fromarray(values))
    np.testing.assert_array_equal(read_grey(tif), values)
    bmp = save_pil(tmp_path / "a.bmp", Image.fromarray(GRADIENT))
    np.testing.assert_array_equal(read_grey(bmp), GRADIENT)


def test_rgb_jpeg_is_luminance(tmp_path):
    rgb = np.stack([GRADIENT, GRADIENT // 2, 255 - GRADIENT], axis=-1)
    path = save_pil(tmp_path / "c.jpg", Image.fromarray(rgb), quality=95)
    grey = read_grey(path)
    assert grey.shape == (24, 32) and grey.dtype == np.float32
    expected = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.abs(grey - expected).mean() < 6  # lossy JPEG, chroma subsampling


def test_rgba_png_ignores_alpha(tmp_path):
    rgb = np.stack([GRADIENT] * 3, axis=-1)
    alpha = np.zeros_like(GRADIENT)  # fully transparent: alpha must not matter
    path = save_pil(tmp_path / "a.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    np.testing.assert_allclose(read_grey(path), GRADIENT, atol=1e-3)


def test_palette_png_goes_through_palette(tmp_path):
    img = Image.fromarray(GRADIENT % 16).convert("P")  # indices 0..15
    # Palette index i -> grey value 255 - 10*i: not the identity, so indices would differ.
    palette = [v for i in range(256) for v in (max(0, 255 - 10 * i),) * 3]
    img.putpalette(palette)
    path = save_pil(tmp_path / "p.png", img)
    with Image.open(path) as check:
        assert check.mode == "P"
    np.testing.assert_allclose(read_grey(path), 255 - 10 * (GRADIENT % 16), atol=1e-3)


def test_jpeg_exif_orientation_applied(tmp_path):
    img = Image.fromarray(GRADIENT)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save_pil(tmp_path / "r.jpg", img, exif=exif, quality=95)
    grey = read_grey(path)
    assert grey.shape == (32, 24)
    assert np.abs(grey - np.rot90(GRADIENT, -1)).mean() < 4


# --------------------------------------------------------------------------- DICOM

DICOM_PIXELS = (np.arange(20 * 30).reshape(20, 30) * 7 + 100).astype(np.uint16)  # 100..4293


def test_dicom_monochrome2(tmp_path):
    grey = read_grey(write_dicom(tmp_path / "m2.dcm", DICOM_PIXELS))
    assert grey.dtype == np.float32 and grey.shape == (20, 30)
    np.testing.assert_array_equal(grey, DICOM_PIXELS)


def test_dicom_monochrome1_is_inverted(tmp_path):
    m2 = read_grey(write_dicom(tmp_path / "m2.dcm", DICOM_PIXELS, "MONOCHROME2"))
    m1 = read_grey(write_dicom(tmp_path / "m1.dcm", DICOM_PIXELS, "MONOCHROME1"))
    np.testing.assert_array_equal(m1, m2.max() + m2.min() - m2)
    u2 = load_image(tmp_path / "m2.dcm", Preprocess(size=30))
    u1 = load_image(tmp_path / "m1.dcm", Preprocess(size=30))
    assert np.abs(u1.astype(int) - (255 - u2.astype(int))).max() <= 1


def test_dicom_rescale_slope_intercept(tmp_path):
    path = write_dicom(tmp_path / "r.dcm", DICOM_PIXELS, RescaleSlope=2, RescaleIntercept=-1000)
    np.testing.assert_allclose(read_grey(path), DICOM_PIXELS * 2.0 - 1000)


def test_dicom_window_clips_outside(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", DICOM_PIXELS, WindowCenter=2000, WindowWidth=1000)
    grey = read_grey(path)
    below, above = DICOM_PIXELS < 1400, DICOM_PIXELS > 2600
    assert below.any() and above.any()
    assert np.all(grey[below] == grey.min()) and np.all(grey[above] == grey.max())
    inside = ~below & ~above
    assert len(np.unique(grey[inside])) > 50  # linear ramp inside the window
    assert np.all(np.diff(grey.ravel()) >= 0)  # input is increasing, so is the output


def test_dicom_multiframe_uses_first_frame(tmp_path):
    frames = np.stack([DICOM_PIXELS, DICOM_PIXELS[::-1], DICOM_PIXELS * 0 + 5])
    grey = read_grey(write_dicom(tmp_path / "mf.dcm", frames))
    np.testing.assert_array_equal(grey, DICOM_PIXELS)


def test_dicom_rle_compressed(tmp_path):
    path = write_dicom(tmp_path / "rle.dcm", DICOM_PIXELS, syntax=RLELossless)
    np.testing.assert_array_equal(read_grey(path), DICOM_PIXELS)


def test_dicom_jpeg_baseline(tmp_path):
    # Pillow is pydicom's JPEG baseline plugin here; 8-bit grey, lossy.
    buf = io.BytesIO()
    Image.fromarray(GRADIENT).save(buf, "JPEG", quality=95)
    encoded = encapsulate([buf.getvalue()])
    path = write_dicom(tmp_path / "jpg.dcm", GRADIENT, syntax=JPEGBaseline8Bit, encoded=encoded)
    assert np.abs(read_grey(path) - GRADIENT).mean() < 3


def test_dicom_rgb_is_luminance(tmp_path):
    rgb = np.stack([GRADIENT, GRADIENT // 2, 255 - GRADIENT], axis=-1)
    grey = read_grey(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    expected = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(grey, expected, rtol=1e-5)


def test_dicom_palette_goes_through_lut(tmp_path):
    indices = (GRADIENT % 16).astype(np.uint8)
    lut = (4000 - 200 * np.arange(256)).clip(0).astype("<u2")  # grey ramp, reversed
    attrs = {
        f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")
    }
    attrs.update(
        {f"{c}PaletteColorLookupTableData": lut.tobytes() for c in ("Red", "Green", "Blue")}
    )
    path = write_dicom(tmp_path / "pal.dcm", indices, photometric="PALETTE COLOR", **attrs)
    np.testing.assert_allclose(read_grey(path), lut[indices], rtol=1e-5)


def test_is_dicom_by_preamble_or_suffix(tmp_path):
    dcm = write_dicom(tmp_path / "noext", DICOM_PIXELS)
    assert is_dicom(dcm)
    np.testing.assert_array_equal(read_grey(dcm), DICOM_PIXELS)
    assert is_dicom(tmp_path / "missing.DCM")
    png = save_pil(tmp_path / "a.png", Image.fromarray(GRADIENT))
    assert not is_dicom(png)
    assert IMAGE_SUFFIXES == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}


# --------------------------------------------------------------------------- scaling


def test_scale_percentiles_exact():
    img = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.float32)
    np.testing.assert_array_equal(scale_percentiles(img, 0, 100), [[0, 51, 102], [153, 204, 255]])
    # 20th..80th percentile = 1..4: values outside clip, inside are linear (85 per step).
    np.testing.assert_array_equal(scale_percentiles(img, 20, 80), [[0, 0, 85], [170, 255, 255]])


def test_scale_percentiles_constant_is_zero():
    with np.errstate(all="raise"):  # no divide-by-zero, no NaN
        out = scale_percentiles(np.full((4, 5), 7.0, np.float32))
    assert out.dtype == np.uint8 and out.shape == (4, 5) and not out.any()


def test_scale_percentiles_ignores_non_finite():
    img = np.array([[0, 1, 2], [3, np.nan, np.inf]], dtype=np.float32)
    np.testing.assert_array_equal(scale_percentiles(img, 0, 100), [[0, 85, 170], [255, 0, 255]])


def test_scale_percentiles_bad_arguments():
    with pytest.raises(ValueError):
        scale_percentiles(np.zeros((2, 2)), 60, 40)
    with pytest.raises(ValueError):
        scale_percentiles(np.zeros((2, 2, 3)))


# --------------------------------------------------------------------------- fitting


def test_fit_squash():
    img = np.full((10, 40), 200, np.uint8)
    out = fit_to_square(img, 16, "squash")
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert np.all(out == 200)


def test_fit_letterbox_keeps_aspect_and_centres():
    img = np.full((10, 40), 200, np.uint8)  # 4:1 landscape
    out = fit_to_square(img, 16, "letterbox")
    assert out.shape == (16, 16) and out.dtype == np.uint8
    rows = np.flatnonzero(out.any(axis=1))
    assert np.all(out[rows] == 200) and len(rows) == 4  # 40->16 so 10->4
    assert rows[0] == 6 and rows[-1] == 9  # (16-4)//2 = 6 zero rows above, 6 below
    assert not out[:6].any() and not out[10:].any()
    tall = fit_to_square(img.T.copy(), 16, "letterbox")
    np.testing.assert_array_equal(tall, out.T)


def tilted_film(angle: float) -> np.ndarray:
    """A 200 x 120 portrait film (with a brighter bone band) rotated ``angle`` degrees inside a
    black canvas, as exported films often are."""
    film = np.zeros((300, 400), np.uint8)
    film[50:250, 100:220] = 120
    film[60:240, 150:170] = 230
    return np.asarray(Image.fromarray(film).rotate(angle, resample=Image.Resampling.BILINEAR, expand=True))


@pytest.mark.parametrize("angle", [-44.0, -30.0, -5.0, 3.0, 20.0, 40.0])
def test_deskew_straightens_and_crops_a_tilted_film(angle):
    out = deskew_film(tilted_film(angle))
    # back to an upright 200 x 120 portrait (a pixel of blur at each edge), filling the crop
    assert abs(out.shape[0] - 200) <= 4 and abs(out.shape[1] - 120) <= 4
    assert (out > 8).mean() > 0.97
    # the bone band runs down the film again: its columns are the brightest ones
    profile = out[20:-20].mean(axis=0)
    band = np.flatnonzero(profile > 175)          # halfway between film (120) and bone (230)
    assert abs(len(band) - 20) <= 3 and abs(band.mean() - out.shape[1] / 2) <= 3


def test_deskew_keeps_a_film_turned_by_a_right_angle_as_it_is():
    # a quarter turn is how the film was taken (landscape), not a tilt: only the crop happens
    out = deskew_film(tilted_film(90.0))
    assert out.shape == (120, 200)


def test_deskew_leaves_full_frame_and_empty_images_alone():
    full = np.full((30, 50), 100, np.uint8)
    np.testing.assert_array_equal(deskew_film(full), full)
    black = np.zeros((30, 50), np.uint8)
    np.testing.assert_array_equal(deskew_film(black), black)
    line = np.zeros((30, 50), np.uint8)
    line[10, 5:45] = 200                        # all film pixels on one line: no hull, only the crop
    assert deskew_film(line).shape == (1, 40)


def test_fit_deskew_letterboxes_the_straightened_film():
    out = fit_to_square(tilted_film(25.0), 64, "deskew")
    assert out.shape == (64, 64) and out.dtype == np.uint8
    cols = np.flatnonzero((out > 8).any(axis=0))
    assert len(cols) in range(36, 42)          # 120/200 of 64 = 38 columns of film, centred
    assert abs((cols[0] + cols[-1]) / 2 - 31.5) <= 1.5
    assert np.flatnonzero((out > 8).any(axis=1)).size >= 62


def test_fit_deskew_of_a_large_film_matches_straightening_at_full_size():
    # fit="deskew" straightens a copy shrunk to 4x the output size; the output must not show it
    big = np.kron(tilted_film(12.0), np.ones((6, 6), np.uint8))        # ~2,500 px on its long side
    fast = fit_to_square(big, 64, "deskew")
    full = fit_to_square(deskew_film(big), 64, "letterbox")

    def layout(img):   # first/last film column and row, and the bone band's centre column
        cols, rows = np.flatnonzero((img > 8).any(axis=0)), np.flatnonzero((img > 8).any(axis=1))
        band = np.flatnonzero(img[10:-10].mean(axis=0) > 175)
        return np.array([cols[0], cols[-1], rows[0], rows[-1], band.mean()])

    assert np.abs(layout(fast) - layout(full)).max() <= 1   # at most a pixel's rounding apart


def test_crop_to_film_cuts_the_black_canvas_away_without_turning_the_film():
    img = np.zeros((40, 60), np.uint8)
    img[5:25, 10:50] = 120                      # the film
    img[12, 0] = 5                              # canvas noise under the background level
    out = crop_to_film(img)
    assert out.shape == (20, 40) and np.all(out == 120)
    black = np.zeros((30, 50), np.uint8)        # no film: unchanged
    np.testing.assert_array_equal(crop_to_film(black), black)


def test_fit_crop_squashes_the_film_box_so_the_canvas_does_not_set_the_anatomys_size():
    small = np.zeros((300, 300), np.uint8)
    small[100:200, 120:180] = 120               # a small film in a large canvas
    small[100:200, 145:155] = 230
    framed = fit_to_square(small, 32, "crop")
    alone = fit_to_square(small[100:200, 120:180].copy(), 32, "squash")
    np.testing.assert_array_equal(framed, alone)
    assert (fit_to_square(small, 32, "squash") > 8).mean() < 0.1 and (framed > 8).all()


def test_fit_upscale_and_bad_arguments():
    out = fit_to_square(np.array([[0, 255]], np.uint8), 8, "squash")
    assert out.shape == (8, 8) and np.all(np.diff(out[0].astype(int)) >= 0)
    with pytest.raises(ValueError):
        fit_to_square(np.zeros((4, 4), np.uint8), 8, "foo")
    with pytest.raises(ValueError):
        fit_to_square(np.zeros((4, 4), np.float32), 8)
    with pytest.raises(ValueError):
        Preprocess(fit="foo")


# --------------------------------------------------------------------------- the chain


def test_load_image_chain(tmp_path):
    path = save_pil(tmp_path / "g.png", Image.fromarray(GRADIENT))
    out = load_image(path, Preprocess(size=20, fit="letterbox"))
    assert out.shape == (20, 20) and out.dtype == np.uint8
    assert out.max() == 255
    assert load_image(path).shape == (128, 128)


def test_preprocess_key_changes_with_every_field():
    base = Preprocess()
    assert base.key() == Preprocess().key()
    variants = [
        Preprocess(size=64),
        Preprocess(fit="letterbox"),
        Preprocess(fit="deskew"),
        Preprocess(fit="crop"),
        Preprocess(pct_low=1.0),
        Preprocess(pct_high=99.0),
        Preprocess(pct_low=0.5000001),
    ]
    keys = {base.key(), *(v.key() for v in variants)}
    assert len(keys) == 1 + len(variants)
    assert all(len(k) < 64 for k in keys)


def test_limits_validate():
    with pytest.raises(ValueError):
        Limits(pixel_cap=0)

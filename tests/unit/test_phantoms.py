"""The synthetic radiograph generator: layout, determinism, anatomy sanity, plan, validation."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonecluster import BODY_PARTS
from bonecluster.data.phantoms import (FINDINGS, generate_phantoms, make_contact_sheet,
                                       plan_studies, render_labelled, render_phantom, texture_field)

_IMAGE = re.compile(r"^XR_(?P<part>[A-Z]+)/patient(?P<patient>\d{5})/study(?P<study>\d+)_"
                    r"(?P<label>positive|negative)/image(?P<image>\d+)\.png$")


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "phantoms"
    summary = generate_phantoms(out, n=35, size=64, seed=3, workers=1, progress=False)
    return out, summary


# ----------------------------------------------------------------------------- layout


def test_layout_counts_and_png_format(small_set):
    out, summary = small_set
    split = out / "train"
    images = sorted(split.rglob("*.png"))
    assert summary.n_images == len(images) == 35
    assert summary.per_part == {part: 5 for part in BODY_PARTS}
    assert not list(out.rglob("*.tmp"))
    found = Counter()
    for path in images:
        m = _IMAGE.match(path.relative_to(split).as_posix())
        assert m, path
        found[m["part"], m["label"]] += 1
        with Image.open(path) as im:
            assert im.mode == "L" and im.format == "PNG"
            assert max(im.size) == 64
    assert {part for part, _ in found} == set(BODY_PARTS)
    assert {label for _, label in found} == {"positive", "negative"}


def test_studies_have_views_and_numbering(small_set):
    out, summary = small_set
    studies = [p for p in (out / "train").glob("XR_*/patient*/study*") if p.is_dir()]
    assert len(studies) == summary.n_studies
    assert sum(s.name.endswith("_positive") for s in studies) == summary.n_abnormal_studies
    per_patient = defaultdict(list)
    part_of = {}
    for s in studies:
        n_images = len(list(s.glob("image*.png")))
        assert 2 <= n_images <= 4
        assert sorted(p.name for p in s.glob("*.png")) == [f"image{k}.png" for k in range(1, n_images + 1)]
        per_patient[s.parent.name].append(int(s.name[5:].split("_")[0]))
        assert part_of.setdefault(s.parent.name, s.parent.parent.name) == s.parent.parent.name
    for numbers in per_patient.values():
        assert sorted(numbers) == list(range(1, len(numbers) + 1))


def test_mura_csvs_list_every_image_and_study(small_set):
    out, summary = small_set
    rows = (out / "train_image_paths.csv").read_text().splitlines()
    assert len(rows) == summary.n_images
    for row in rows:
        assert row.startswith(f"{out.name}/train/XR_")
        assert (out.parent / row).is_file()
    with open(out / "train_labeled_studies.csv", newline="") as fh:
        labels = list(csv.reader(fh))
    assert len(labels) == summary.n_studies
    for folder, label in labels:
        assert folder.endswith("/") and (out.parent / folder).is_dir()
        assert label == ("1" if "_positive/" in folder else "0")


def test_rerun_replaces_its_own_output_but_not_a_foreign_folder(tmp_path):
    out = tmp_path / "ph"
    generate_phantoms(out, n=21, size=32, seed=0, progress=False)
    generate_phantoms(out, n=14, size=32, seed=0, progress=False)
    assert len(list(out.rglob("*.png"))) == 14  # nothing left over from the bigger run
    foreign = tmp_path / "mine" / "train"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by"):
        generate_phantoms(tmp_path / "mine", n=7, size=32, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, small_set):
    out, _ = small_set
    again = generate_phantoms(tmp_path / "phantoms", n=35, size=64, seed=3, workers=2, progress=False)
    assert again.n_images == 35
    a, b = _digests(out / "train"), _digests(tmp_path / "phantoms" / "train")
    assert a == b


def test_other_seed_other_images(tmp_path, small_set):
    out, _ = small_set
    generate_phantoms(tmp_path / "phantoms", n=35, size=64, seed=4, workers=1, progress=False)
    a = set(_digests(out / "train").values())
    b = set(_digests(tmp_path / "phantoms" / "train").values())
    assert not a & b


def test_valid_split_differs_from_train_and_numbers_its_own_patients(tmp_path, small_set):
    out, _ = small_set
    generate_phantoms(tmp_path / "phantoms", n=35, size=64, seed=3, split="valid", progress=False)
    valid = tmp_path / "phantoms" / "valid"
    assert not set(_digests(out / "train").values()) & set(_digests(valid).values())
    patients = {int(p.name[7:]) for p in valid.glob("XR_*/patient*")}
    assert patients and min(patients) >= 90001
    assert (tmp_path / "phantoms" / "valid_image_paths.csv").exists()


def test_render_phantom_is_reproducible():
    a = render_phantom("wrist", "fracture", np.random.default_rng(5), 96)
    b = render_phantom("XR_WRIST", "fracture", np.random.default_rng(5), 96)
    c = render_phantom("wrist", "fracture", np.random.default_rng(6), 96)
    assert a.dtype == np.uint8 and a.ndim == 2 and max(a.shape) == 96
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ----------------------------------------------------------------------------- anatomy


@pytest.mark.parametrize("part", BODY_PARTS)
def test_cortex_brighter_than_marrow_and_bone_than_background(part):
    cortex, marrow, bone, background = [], [], [], []
    for i in range(6):
        img, masks = render_phantom(part, None, np.random.default_rng([11, i]), 128, return_masks=True)
        assert img.dtype == np.uint8 and max(img.shape) == 128
        assert masks["cortex"].sum() > 20 and masks["marrow"].sum() > 20 and masks["background"].sum() > 20
        cortex.append(img[masks["cortex"]].mean())
        marrow.append(img[masks["marrow"]].mean())
        bone.append(img[masks["bone"]].mean())
        background.append(img[masks["background"]].mean())
    assert np.mean(cortex) > np.mean(marrow) + 8
    assert np.mean(bone) > np.mean(background) + 60


def test_findings_show_up_where_they_should():
    metal, cortex, hole, marrow = [], [], [], []
    for i in range(4):
        img, m = render_phantom("forearm", "plate", np.random.default_rng([12, i]), 128, return_masks=True)
        metal.append(img[m["metal"]].mean())
        cortex.append(img[m["cortex"]].mean())
        img, m = render_phantom("humerus", "lesion", np.random.default_rng([13, i]), 128, return_masks=True)
        hole.append(img[m["lesion"]].mean())
        marrow.append(img[m["marrow"]].mean())
    assert np.mean(metal) > np.mean(cortex) + 10  # radio-opaque hardware outshines bone
    assert np.mean(hole) < np.mean(marrow) - 10   # a lytic lesion is a dark hole


def test_films_are_not_square_and_fingers_are_narrower_than_shoulders():
    def aspect(part):
        shapes = [render_phantom(part, None, np.random.default_rng([14, i]), 64).shape for i in range(8)]
        return np.mean([w / h for h, w in shapes])
    assert aspect("FINGER") < 0.8 < aspect("SHOULDER")


def test_contact_sheet(tmp_path):
    path = make_contact_sheet(tmp_path / "sheet.png", size=48, seed=0, n_normal=1)
    with Image.open(path) as im:
        assert im.mode == "L" and im.width > 48 * (1 + len(FINDINGS)) and im.height > 48 * len(BODY_PARTS)


# ----------------------------------------------------------------------------- plan


def test_plan_balances_parts_and_labels():
    plans = plan_studies(570, seed=0)
    assert sum(p.n_views for p in plans) == 570
    per_part = Counter()
    for p in plans:
        per_part[p.part] += p.n_views
        assert 2 <= p.n_views <= 4
        assert (p.finding in FINDINGS) == p.abnormal and (p.finding is None) == (not p.abnormal)
    assert max(per_part.values()) - min(per_part.values()) <= 1
    share = np.mean([p.abnormal for p in plans])
    assert len(plans) >= 180 and 0.33 <= share <= 0.47
    assert set(p.finding for p in plans if p.abnormal) == set(FINDINGS)
    assert [p.index for p in plans] == list(range(len(plans)))


def test_plan_patients_are_unique_and_studies_count_from_one():
    plans = plan_studies(400, seed=1)
    studies = defaultdict(list)
    for p in plans:
        studies[p.patient].append(p)
    assert any(len(s) > 1 for s in studies.values())  # some patients come back
    for s in studies.values():
        assert len({p.part for p in s}) == 1
        assert sorted(p.study for p in s) == list(range(1, len(s) + 1))
    assert plan_studies(400, seed=1) == plans


def test_smallest_dataset_has_one_image_per_part():
    plans = plan_studies(7, seed=0)
    assert sorted(p.part for p in plans) == sorted(BODY_PARTS)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 6}, "n must be"),
    ({"n": 7.5}, "n must be"),
    ({"size": 31}, "size must be"),
    ({"split": ""}, "split must be"),
    ({"split": "../x"}, "split must be"),
    ({"workers": 0}, "workers must be"),
    ({"seed": -1}, "seed must be"),
])
def test_generate_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_phantoms(tmp_path / "ph", **{"n": 14, "size": 32, "progress": False, **kwargs})
    assert not (tmp_path / "ph").exists()


def test_render_rejects_unknown_part_and_finding():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown body part"):
        render_phantom("knee", None, rng, 64)
    with pytest.raises(ValueError, match="unknown finding"):
        render_phantom("hand", "tumour", rng, 64)
    with pytest.raises(ValueError, match="n must be"):
        plan_studies(0)


def test_texture_field_is_standardised_band_limited_and_streaked():
    field = texture_field(128, 96, 8.0, np.random.default_rng(0))
    assert field.shape == (128, 96) and field.dtype == np.float32
    assert abs(float(field.mean())) < 1e-5 and abs(float(field.std()) - 1.0) < 1e-4
    assert np.array_equal(field, texture_field(128, 96, 8.0, np.random.default_rng(0)))
    # Its power peaks near the asked frequency, 1/8 cycles per pixel.
    power = np.abs(np.fft.fft2(texture_field(256, 256, 8.0, np.random.default_rng(1)))) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(256), np.fft.fftfreq(256)))
    rings = np.array([power[(f >= lo) & (f < lo + 0.02)].mean() for lo in np.arange(0.0, 0.5, 0.02)])
    assert 0.08 <= 0.02 * int(rings.argmax()) + 0.01 <= 0.17, rings.argmax()
    # Elongated along the vertical axis: it changes faster across (x) than along (y).
    streaks = texture_field(256, 256, 8.0, np.random.default_rng(2), elongation=3.0, axis=(0.0, 1.0))
    across, along = np.abs(np.diff(streaks, axis=1)).mean(), np.abs(np.diff(streaks, axis=0)).mean()
    assert across > 2.0 * along, (across, along)
    with pytest.raises(ValueError, match="wavelength"):
        texture_field(8, 8, 0.0, np.random.default_rng(0))


def test_texture_roughens_marrow_and_tissue_and_leaves_the_film_otherwise_alone():
    change = {k: [] for k in ("marrow", "tissue", "cortex", "background")}
    spread_flat, spread_textured = [], []
    for i, part in enumerate(("FOREARM", "HUMERUS", "FINGER", "ELBOW")):
        flat, masks = render_phantom(part, None, np.random.default_rng(i), 192, return_masks=True)
        textured, masks_t = render_phantom(part, None, np.random.default_rng(i), 192, return_masks=True,
                                           texture=1.0)
        assert flat.shape == textured.shape
        assert all(np.array_equal(masks[k], masks_t[k]) for k in masks)   # same anatomy, pose, markers
        diff = textured.astype(np.float32) - flat
        for k in change:
            change[k].append(float(diff[masks[k]].std()))
        spread_flat.append(float(flat[masks["marrow"]].std()))
        spread_textured.append(float(textured[masks["marrow"]].std()))
    mean = {k: np.mean(v) for k, v in change.items()}
    # Grey levels: the streaks sit in the marrow, the mottle in the tissue; the cortex moves only
    # where the blur mixes it with marrow, and the background only next to the tissue's edge.
    assert mean["marrow"] > 5 and mean["marrow"] > 2 * mean["cortex"], mean
    assert mean["tissue"] > 2 and mean["background"] < 1, mean
    assert all(t > f for t, f in zip(spread_textured, spread_flat)), (spread_flat, spread_textured)
    plain = render_labelled(5, 64)
    assert np.array_equal(plain.pixels, render_labelled(5, 64, texture=0.0).pixels)
    rough = render_labelled(5, 64, texture=2.0)
    assert (rough.part, rough.view, rough.finding) == (plain.part, plain.view, plain.finding)
    assert not np.array_equal(plain.pixels, rough.pixels)
    for bad in (-0.1, 2.5, True, "1"):
        with pytest.raises(ValueError, match="phantoms.texture"):
            render_labelled(0, 64, texture=bad)

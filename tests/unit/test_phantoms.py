"""The synthetic radiograph generator: layout, determinism, anatomy sanity, plan, validation."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonecluster import BODY_PARTS
from bonecluster.data import phantoms as ph
from bonecluster.data.phantoms import (FINDINGS, generate_phantoms, make_contact_sheet, make_twin_sheet,
                                       plan_studies, render_labelled, render_phantom, render_twins,
                                       texture_field)

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


def test_framing_widens_magnification_centring_and_shutters_only():
    """phantoms.framing: the pose's scale and shift and the shutters' reach widen with it; the
    same number of draws keeps every other property of the film (its labels here) in place."""
    def poses(framing):
        rng = np.random.default_rng(0)
        return [ph._sample_pose("HUMERUS", rng, framing) for _ in range(2000)]

    narrow, wide = poses(0.0), poses(1.0)
    assert 0.85 <= min(p.scale for p in narrow) and max(p.scale for p in narrow) <= 1.08
    assert min(p.scale for p in wide) < 0.70 and max(p.scale for p in wide) > 1.25
    assert max(abs(p.shift[0]) for p in narrow) <= 0.05 < max(abs(p.shift[0]) for p in wide) <= 0.15
    assert [p.angle for p in narrow] == [p.angle for p in wide]   # the other draws stay in step

    def kept_share(framing):   # how much of the film the shutters leave (1 for the films without)
        shares = []
        for i in range(200):
            cv = ph._Canvas(64, 48, ph._sample_pose("WRIST", np.random.default_rng(i)))
            shares.append(float(ph._collimate(np.zeros((64, 48), np.float32), cv,
                                              np.random.default_rng(i), framing).mean()))
        return np.array(shares)

    assert kept_share(1.0).min() < kept_share(0.0).min() - 0.1
    assert kept_share(1.0).mean() < kept_share(0.0).mean()
    # Drawing a film takes as many random numbers whatever the framing, so what is drawn after
    # it (the next film of a study) stays as it was.
    after = []
    for framing in (0.0, 1.0):
        rng = np.random.default_rng(5)
        patient = ph.sample_patient("ELBOW", rng)
        ph._render_view(patient, ph._sample_views(1, rng)[0], (), "L", 48, rng, framing=framing)
        after.append(rng.bit_generator.state)
    assert after[0] == after[1]
    plain = render_labelled(7, 64)   # framing 0 (test_normal_films_are_the_same_bytes_... pins its bytes)
    framed = render_labelled(7, 64, framing=1.0)
    assert (framed.part, framed.view, framed.finding) == (plain.part, plain.view, plain.finding)
    assert not np.array_equal(plain.pixels, framed.pixels)
    for bad in (-0.5, 2.1, False, None):
        with pytest.raises(ValueError, match="phantoms.framing"):
            render_labelled(0, 64, framing=bad)


def test_growth_plates_cross_every_long_bone_near_both_ends_and_are_no_lesion():
    """phantoms.children: two radiolucent bands per bone that can carry a finding, each as wide as
    the bone and darkening it where drawn; not counted in the lesion mask."""
    rng = np.random.default_rng(3)
    patient = ph.sample_patient("FOREARM", rng)
    anatomy = ph.build_anatomy(patient, ph.View(0.0, 0.5))
    long_bones = [b for b in anatomy.bones if b.target > 0]
    assert {b.name for b in long_bones} == {"radius", "ulna"}
    ph.add_growth_plates(anatomy, np.random.default_rng(0))
    assert len(anatomy.holes) == 2 * len(long_bones) and not any(h.lesion for h in anatomy.holes)
    for hole, bone in zip(anatomy.holes, [b for b in long_bones for _ in range(2)]):
        assert hole.shape.ry >= 1.6 * bone.radius > hole.shape.rx   # across the bone, thin along it
    cv = ph._Canvas(96, 64, ph.Pose(scale=1.0, angle=0.0, shift=(0.0, 0.0), mirror=1.0))
    plain = ph._draw_anatomy(ph.build_anatomy(patient, ph.View(0.0, 0.5)), cv)
    child = ph._draw_anatomy(anatomy, cv)
    assert not child.hole.any()
    checked = 0
    for hole in anatomy.holes:
        r, c = (int(round(v)) for v in cv.to_pixel(*hole.shape.c)[::-1])
        if 0 <= r < 96 and 0 <= c < 64 and plain.bone[r, c] > 0:
            assert child.bone[r, c] < 0.6 * plain.bone[r, c]
            checked += 1
    assert checked >= 2   # the plates on the film (the rest lie off it)


def test_children_change_a_share_of_the_films_and_not_their_labels(monkeypatch):
    plain = [render_labelled(i, 48) for i in range(60)]
    assert all(np.array_equal(a.pixels, render_labelled(i, 48, children=0.0).pixels) for i, a in enumerate(plain[:5]))
    some = [render_labelled(i, 48, children=0.3) for i in range(60)]
    every = [render_labelled(i, 48, children=1.0) for i in range(60)]
    for a, b, c in zip(plain, some, every):
        assert (a.part, a.view, a.finding) == (b.part, b.view, b.finding) == (c.part, c.view, c.finding)
        assert a.pixels.shape == b.pixels.shape == c.pixels.shape
    changed = np.array([not np.array_equal(a.pixels, b.pixels) for a, b in zip(plain, some)])
    assert 0.1 < changed.mean() < 0.5
    # a child at 0.3 is the same film as at 1.0: the share only decides who is one
    assert all(np.array_equal(b.pixels, c.pixels) for b, c, ch in zip(some, every, changed) if ch)
    assert sum(not np.array_equal(a.pixels, c.pixels) for a, c in zip(plain, every)) >= 55
    for bad in (-0.1, 1.5, True, "0.3"):
        with pytest.raises(ValueError, match="phantoms.children"):
            render_labelled(0, 48, children=bad)
    # a child's film has its growth plates drawn, an adult's none
    drawn = []
    real = ph.add_growth_plates
    monkeypatch.setattr(ph, "add_growth_plates", lambda an, rng: drawn.append(1) or real(an, rng))
    render_labelled(0, 48, children=1.0)
    render_labelled(0, 48)
    assert drawn == [1]


def _whole_arm(part: str, seed: int = 3):
    """A part's anatomy alone, as kept in its whole-arm film (a forearm's stubs give way), and the whole arm."""
    rng = np.random.default_rng(seed)
    patient, view = ph.sample_patient(part, rng), ph.View(0.0, 0.5)
    own = [b for b in ph.build_anatomy(patient, view).bones if not (part == "FOREARM" and b.name.startswith("edge"))]
    arm = ph.add_whole_arm(ph.build_anatomy(patient, view), patient, view, np.random.default_rng(seed))
    return patient, view, own, arm, len(own)


@pytest.mark.parametrize("part, neighbours", [("HUMERUS", ("FOREARM", "HAND")), ("FOREARM", ("HAND", "HUMERUS"))])
def test_whole_arm_adds_the_neighbours_at_the_arms_proportions_and_keeps_the_part(part, neighbours):
    patient, view, own, arm, n_own = _whole_arm(part)
    # the part's own bones come first, unchanged but for one shift of the film's centre along the
    # arm: a humerus film's towards the forearm (the anatomy moves up), a forearm film's either way
    dy = arm.bones[0].bounds()[2] - own[0].bounds()[2]
    assert -0.3 - 1e-9 <= dy <= (1e-9 if part == "HUMERUS" else 0.3 + 1e-9)
    for a, b in zip(own, arm.bones[:n_own]):
        assert a.name == b.name and a.group == b.group
        assert np.allclose(np.array(b.bounds()) - np.array(a.bounds()), [0.0, 0.0, dy, dy])
    added = arm.bones[n_own:]
    assert added and all(b.group.startswith("arm:") for b in added)   # no finding of the part moves them
    # each neighbour's bones in turn, its stubs left out, scaled to the arm's proportions and then
    # only turned and moved: every bone keeps its shape, k times as large
    rest = list(added)
    for other in neighbours:
        built = [b for b in ph.build_anatomy(replace(patient, part=other), view).bones
                 if not b.name.startswith(ph._ARM_DROP[other])]
        k = ph._CM_PER_UNIT[other] / ph._CM_PER_UNIT[part]
        mine, rest = rest[:len(built)], rest[len(built):]
        assert [b.name for b in mine] == [b.name for b in built]
        for b, ref in zip(mine, built):
            assert b.cortex == pytest.approx(k * ref.cortex)
            if isinstance(ref.shaft, ph.Capsule):
                assert b.shaft.length == pytest.approx(k * ref.shaft.length, rel=1e-9)
    assert not rest and not any(b.name.startswith("edge") for b in arm.bones)
    # lateral to lateral: every builder draws the radius, the thumb and the greater tuberosity at -x
    # (a half turn instead of a mirror would put them medial)
    centre = {b.name: 0.5 * (b.bounds()[0] + b.bounds()[1]) for b in added}
    if part == "HUMERUS":
        assert centre["radius"] < centre["ulna"] and centre["r1mc"] < centre["r5mc"]
    else:
        assert centre["r1mc"] < centre["r5mc"] and centre["humerus"] < centre["scapula"]
    # the neighbours lie along the arm, beyond the part's own ends
    own_top = min(b.bounds()[2] for b in arm.bones[:n_own])
    own_bottom = max(b.bounds()[3] for b in arm.bones[:n_own])
    assert max(b.bounds()[3] for b in added) > own_bottom + 0.5
    if part == "FOREARM":   # and the hand above the wrist
        assert min(b.bounds()[2] for b in added) < own_top - 0.3


def test_whole_arm_is_drawn_for_long_arm_films_only_and_changes_only_their_share():
    rng = np.random.default_rng(0)
    patient = ph.sample_patient("ELBOW", rng)
    with pytest.raises(ValueError, match="whole-arm"):
        ph.add_whole_arm(ph.build_anatomy(patient, ph.View(0.0, 0.5)), patient, ph.View(0.0, 0.5), rng)
    # the films without whole arms are the bytes the code gave before whole_arm existed (f2f0fc2)
    pinned = hashlib.sha256()
    for i in range(12):
        pinned.update(render_labelled(i, 48, children=0.3).pixels.tobytes())
    assert pinned.hexdigest() == "751be6d4b28bab8f25b8fbd8a59a757702969a992e2746812c4fa3e4e19b5eb7"
    plain = [render_labelled(i, 40, children=0.3) for i in range(80)]
    some = [render_labelled(i, 40, children=0.3, whole_arm=0.5) for i in range(80)]
    every = [render_labelled(i, 40, children=0.3, whole_arm=1.0) for i in range(80)]
    arm = np.array([a.part in ph.WHOLE_ARM_PARTS for a in plain])
    changed = np.array([not np.array_equal(a.pixels, b.pixels) for a, b in zip(plain, some)])
    for a, b, c in zip(plain, some, every):
        assert (a.part, a.view, a.finding) == (b.part, b.view, b.finding) == (c.part, c.view, c.finding)
    assert not changed[~arm].any() and 0.2 < changed[arm].mean() < 0.8
    assert all(not np.array_equal(a.pixels, c.pixels) for a, c, m in zip(plain, every, arm) if m)
    assert all(np.array_equal(b.pixels, c.pixels) for b, c, ch in zip(some, every, changed) if ch)
    for bad in (-0.1, 1.5, True, "0.3"):
        with pytest.raises(ValueError, match="phantoms.whole_arm"):
            render_labelled(0, 40, whole_arm=bad)


@pytest.mark.parametrize("size", [32, 96, 256])
def test_annotations_burn_something_and_the_marker_mask_covers_every_pixel_they_change(size):
    for seed in range(30):
        img = np.full((size, (size * 3) // 4), 0.3, dtype=np.float32)
        mask = np.zeros_like(img)
        ph.add_annotations(img, mask, "L", np.random.default_rng(seed))
        changed = img != np.float32(0.3)
        assert changed.any(), seed                       # at least one tag, text block or ruler
        assert (mask[changed] > 0).all()                 # the "marker" mask knows where they are
        again, mask2 = np.full_like(img, 0.3), np.zeros_like(img)
        ph.add_annotations(again, mask2, "L", np.random.default_rng(seed))
        assert np.array_equal(img, again) and np.array_equal(mask, mask2)   # drawn from the rng alone


def test_annotations_change_only_their_share_of_films_and_keep_the_labels():
    plain = [render_labelled(i, 40, children=0.3) for i in range(60)]
    some = [render_labelled(i, 40, children=0.3, annotations=0.5) for i in range(60)]
    every = [render_labelled(i, 40, children=0.3, annotations=1.0) for i in range(60)]
    changed = np.array([not np.array_equal(a.pixels, b.pixels) for a, b in zip(plain, some)])
    for a, b, c in zip(plain, some, every):
        assert (a.part, a.view, a.finding) == (b.part, b.view, b.finding) == (c.part, c.view, c.finding)
    assert 0.25 < changed.mean() < 0.75
    assert sum(not np.array_equal(a.pixels, c.pixels) for a, c in zip(plain, every)) >= 57
    assert all(np.array_equal(b.pixels, c.pixels) for b, c, ch in zip(some, every, changed) if ch)
    for bad in (-0.1, 1.5, True, "0.3"):
        with pytest.raises(ValueError, match="phantoms.annotations"):
            render_labelled(0, 40, annotations=bad)


# ----------------------------------------------------------------------------- conspicuous findings (issue 24)


def _anatomy(part: str, seed: int = 0):
    rng = np.random.default_rng([seed, 1])
    return ph.build_anatomy(ph.sample_patient(part, rng), ph.View(0.0, 0.5))


def _px(n: float) -> float:
    return n / ph.FINDING_REFERENCE_PX


def _main_bone(an) -> int:
    return max(range(len(an.bones)), key=lambda i: an.bones[i].target)


def _tiny_fracture(bone: int) -> ph.Fracture:
    return ph.Fracture(bone=bone, t=0.5, tilt=0.0, gap=0.0, shift=0.0, slide=0.0, turn=0.0, swelling=0.0)


def _smallest_fracture(part: str, least: float = 1.0) -> tuple[float, float, float]:
    """(gap, sideways step, angulation in degrees) of the smallest fracture drawable on the part's main bone."""
    an = _anatomy(part)
    bone = _main_bone(an)
    u, site = an.bones[bone].shaft.direction, an.bones[bone].shaft.at(0.5)
    ph.apply_finding(an, [_tiny_fracture(bone)], least=least)
    near, far = an.bones[bone], an.bones[-1]
    # tilt 0: the fracture line's normal is the shaft; the near fragment ends half a gap before the site
    gap = 2 * (near.cuts[-1][2] + (u[0] * site[0] + u[1] * site[1]))
    # the far fragment turns about the site, then steps sideways: the site's image is the step
    moved_site = far.shaft.at(0.5)
    step = (moved_site[0] - site[0]) * -u[1] + (moved_site[1] - site[1]) * u[0]
    v = far.shaft.direction
    return gap, step, abs(np.degrees(np.arctan2(u[0] * v[1] - u[1] * v[0], u[0] * v[0] + u[1] * v[1])))


def _smallest_plate(part: str, least: float = 1.0, with_fracture: bool = False):
    """The part's anatomy with the smallest plate drawable on its main bone, and that bone."""
    an = _anatomy(part)
    bone = _main_bone(an)
    plate = ph.Plate(bone=bone, t=0.5, length=0.4, side=1, thick=0.0, screws=3, mu=4.0, screw_r=0.0,
                     screw_tilt=0.0, fracture=_tiny_fracture(bone) if with_fracture else None)
    ph.apply_finding(an, [plate], least=least)
    return an, bone


def _plate_and_screw_widths(an) -> tuple[float, list[float]]:
    return 2 * an.metal[0][0].ra, [2 * prim.ra for prim, _ in an.metal[1:] if isinstance(prim, ph.Capsule)]


def _smallest_lesion(part: str, least: float = 1.0) -> ph.Hole:
    an = _anatomy(part)
    ph.apply_finding(an, [ph.Lesion(bone=_main_bone(an), t=0.5, across=0.01, along=0.01, offset=0.0, depth=0.8,
                                    rim=0.0, satellites=())], least=least)
    return an.holes[0]


def _smallest_dislocation(least: float = 1.0) -> float:
    """How far the smallest dislocation of an elbow's first joint moves the bones beyond it."""
    an = _anatomy("ELBOW")
    joint = an.joints[0]
    before = next(b for b in an.bones if b.group in joint.groups).shaft.at(0.0)
    ph.apply_finding(an, [ph.Dislocation(joint=0, shift=0.01, pull=0.0, turn=0.0, swelling=0.0)], least=least)
    after = next(b for b in an.bones if b.group in joint.groups).shaft.at(0.0)
    return np.hypot(after[0] - before[0], after[1] - before[1])


def test_a_fracture_drawn_as_small_as_allowed_still_has_its_minimum_gap_step_and_angulation():
    gap, step, turn = _smallest_fracture("HUMERUS")
    assert gap >= _px(ph.MIN_FRACTURE_GAP_PX) - 1e-9
    assert abs(step) >= _px(ph.MIN_FRACTURE_STEP_PX) - 1e-9
    assert turn >= ph.MIN_FRACTURE_TURN_DEG - 1e-6


def test_a_mild_fracture_under_a_plate_keeps_its_own_small_sizes():
    an, bone = _smallest_plate("FOREARM", with_fracture=True)
    (_, _, c_near), (_, _, c_far) = an.bones[bone].cuts[-1], an.bones[-1].cuts[-1]
    assert abs(-c_near - c_far) < _px(ph.MIN_FRACTURE_GAP_PX)     # the metal is the finding, not the gap
    plate, screws = _plate_and_screw_widths(an)
    assert plate >= _px(ph.MIN_PLATE_THICK_PX) - 1e-9
    assert screws and all(sc >= _px(ph.MIN_SCREW_PX) - 1e-9 for sc in screws)


def test_a_lesion_is_at_least_four_pixels_across_with_a_rim():
    hole = _smallest_lesion("FINGER")
    assert 2 * min(hole.shape.rx, hole.shape.ry) >= _px(ph.MIN_LESION_PX) - 1e-9
    assert hole.rim >= ph.MIN_RIM_DENSITY and hole.rim_width >= _px(ph.MIN_RIM_PX) - 1e-9


def test_a_dislocation_moves_the_joint_at_least_three_pixels():
    assert _smallest_dislocation() >= _px(ph.MIN_DISLOCATION_PX) - 1e-9


def test_a_parts_size_factor_multiplies_every_minimum_size():
    """``least`` (the part's FINDING_SIZE_FACTOR in a film) scales each minimum, the angulation too."""
    least = 2.5
    gap, step, turn = _smallest_fracture("WRIST", least)
    assert gap >= _px(least * ph.MIN_FRACTURE_GAP_PX) - 1e-9
    assert abs(step) >= _px(least * ph.MIN_FRACTURE_STEP_PX) - 1e-9
    assert turn >= least * ph.MIN_FRACTURE_TURN_DEG - 1e-6
    plate, screws = _plate_and_screw_widths(_smallest_plate("SHOULDER", least)[0])
    assert plate >= _px(least * ph.MIN_PLATE_THICK_PX) - 1e-9
    assert screws and all(sc >= _px(least * ph.MIN_SCREW_PX) - 1e-9 for sc in screws)
    hole = _smallest_lesion("HAND", least)
    assert 2 * min(hole.shape.rx, hole.shape.ry) >= _px(least * ph.MIN_LESION_PX) - 1e-9
    assert hole.rim_width >= _px(least * ph.MIN_RIM_PX) - 1e-9
    assert _smallest_dislocation(least) == pytest.approx(least * _smallest_dislocation(1.0))
    assert set(ph.FINDING_SIZE_FACTOR) == set(BODY_PARTS) and min(ph.FINDING_SIZE_FACTOR.values()) >= 1.0


def test_finding_sites_fall_inside_the_box_every_film_of_the_part_shows():
    for part in BODY_PARTS:
        half_w, half_h = ph._shown_box(part)
        for kind in FINDINGS:
            for seed in range(6):
                rng = np.random.default_rng([seed, 2])
                an = ph.build_anatomy(ph.sample_patient(part, rng), ph.View(0.0, 0.5))
                for spec in ph.sample_finding(kind, part, an, rng):
                    x, y = ph._site(an, spec)
                    assert abs(x) <= half_w and abs(y) <= half_h, (part, kind, seed)


def _hand_specs(kind: str, part_rules: bool, n: int = 60) -> list[tuple]:
    """(spec, anatomy) of ``n`` HAND studies with ``kind``: as the demo's phantoms draw them with
    ``part_rules``, as the pre-training films do by default without."""
    out = []
    for seed in range(n):
        rng = np.random.default_rng([seed, 5])
        an = ph.build_anatomy(ph.sample_patient("HAND", rng), ph.View(0.0, 0.5))
        out += [(spec, an) for spec in ph.sample_finding(kind, "HAND", an, rng, part_rules=part_rules)]
    return out


def test_hand_fractures_break_a_metacarpal_and_dislocations_sit_at_its_head_and_both_swell():
    """Rule HD: a broken phalanx swung its digit like a flexed finger on the 64-px film."""
    assert "HAND" in ph.METACARPAL_FINDINGS
    fractures = _hand_specs("fracture", part_rules=True)
    assert {an.bones[f.bone].name for f, an in fractures} <= {f"r{k}mc" for k in range(1, 6)}
    dislocations = _hand_specs("dislocation", part_rules=True)
    moved = {an.joints[d.joint].groups[0] for d, an in dislocations}
    assert moved <= {f"r{k}p1" for k in range(1, 6)} and len(moved) >= 3   # the digit from p1 on moves
    assert all(spec.swelling > 0 for spec, _ in fractures + dislocations)
    # plates and lesions keep every site of the hand
    assert any(not an.bones[pl.bone].name.endswith("mc") for pl, an in _hand_specs("plate", part_rules=True))


def test_without_part_rules_hand_findings_keep_every_site_and_other_parts_are_unchanged():
    """``part_rules=False`` (the pre-training films' default) draws HAND's findings as before rule HD."""
    fractures = _hand_specs("fracture", part_rules=False)
    assert any(an.bones[f.bone].name.endswith(("p1", "p2", "p3")) for f, an in fractures)
    assert any(f.swelling == 0 for f, _ in fractures)
    assert any(an.joints[d.joint].groups[0].endswith(("p2", "p3")) for d, an in _hand_specs("dislocation", False))
    for part in set(BODY_PARTS) - ph.METACARPAL_FINDINGS:
        for kind in FINDINGS:
            if kind == "fracture" and part in ph.FOREARM_BONE_FRACTURES:
                continue   # rule WF2, its own test below
            drawn = []
            for part_rules in (True, False):
                rng = np.random.default_rng([7, 5])
                an = ph.build_anatomy(ph.sample_patient(part, rng), ph.View(0.0, 0.5))
                drawn.append(ph.sample_finding(kind, part, an, rng, part_rules=part_rules))
            assert drawn[0] == drawn[1], (part, kind)


def test_wrist_fractures_break_the_radius_or_the_ulna_and_only_with_part_rules():
    """Rule WF2: a broken scaphoid or metacarpal base hardly changed the 64-px thumbnail."""
    assert "WRIST" in ph.FOREARM_BONE_FRACTURES
    drawn = {True: [], False: []}
    for i in range(200):
        for part_rules in (True, False):
            rng = np.random.default_rng([11, i])
            an = ph.build_anatomy(ph.sample_patient("WRIST", rng), ph.View(0.0, 0.0))
            drawn[part_rules] += [an.bones[f.bone].name for f in ph.sample_finding("fracture", "WRIST", an, rng, part_rules)]
    assert set(drawn[True]) == {"radius", "ulna"}
    # their weights are 3:1; a site off the typical film is drawn again, which costs the radius a little
    assert drawn[True].count("radius") > 2 * drawn[True].count("ulna")
    assert set(drawn[False]) - {"radius", "ulna"}   # the pre-training films' default keeps every site
    # plates, lesions and dislocations of the wrist draw the same with and without the rule
    for kind in ("plate", "lesion", "dislocation"):
        for i in range(12):
            specs = []
            for part_rules in (True, False):
                rng = np.random.default_rng([11, i])
                an = ph.build_anatomy(ph.sample_patient("WRIST", rng), ph.View(0.0, 0.5))
                specs.append(ph.sample_finding(kind, "WRIST", an, rng, part_rules=part_rules))
            assert specs[0] == specs[1], (kind, i)


def test_a_site_rule_on_a_part_without_such_bones_is_a_clear_error():
    from unittest import mock

    rng = np.random.default_rng(0)
    an = ph.build_anatomy(ph.sample_patient("FINGER", rng), ph.View(0.0, 0.5))
    with mock.patch.object(ph, "FOREARM_BONE_FRACTURES", frozenset({"FINGER"})), \
            pytest.raises(ValueError, match="FINGER: no bone of this film can carry the fracture"):
        ph.sample_finding("fracture", "FINGER", an, rng)


@pytest.mark.parametrize("rule, part, kinds, n", [
    ("METACARPAL_FINDINGS", "HAND", ("fracture", "dislocation"), 150),   # rule HD
    ("FOREARM_BONE_FRACTURES", "WRIST", ("fracture",), 300),             # rule WF2
])
def test_the_pre_training_stream_keeps_every_site_unless_part_finding_sizes(rule, part, kinds, n):
    """render_labelled draws the demo's sites (rules HD, WF2) only with part_finding_sizes=True."""
    from unittest import mock

    films = [i for i in range(n) if (f := ph.render_labelled(i, 32)).part == part and f.finding in kinds]
    assert len(films) >= 3
    default = [ph.render_labelled(i, 32).pixels for i in films]
    sized = [ph.render_labelled(i, 32, part_finding_sizes=True).pixels for i in films]
    with mock.patch.object(ph, rule, frozenset()):   # as before the rule
        assert all(np.array_equal(a, ph.render_labelled(i, 32).pixels) for i, a in zip(films, default))
        assert any(not np.array_equal(a, ph.render_labelled(i, 32, part_finding_sizes=True).pixels)
                   for i, a in zip(films, sized))


def test_normal_films_are_the_same_bytes_as_before_the_findings_changed():
    """Issue 24 changed how findings are drawn, not normal anatomy: this digest was taken at a5eeea1."""
    h = hashlib.sha256()
    for i, part in enumerate(BODY_PARTS):
        h.update(render_phantom(part, None, np.random.default_rng([31, i]), 64).tobytes())
    assert h.hexdigest() == "7b87e3499517ee3c1787b07b6afe429eae78b7ab0872ad78252d6464cadbfb4e"


def test_every_finding_shows_on_the_64px_thumbnail_against_its_normal_twin():
    """Twins share patient, view, pose and exposure; the finding must change a visible patch."""
    for part in BODY_PARTS:
        for kind in FINDINGS:
            visible = 0
            for seed in range(6):
                normal, abnormal = render_twins(part, kind, np.random.default_rng([seed, 3]), 64)
                assert normal.shape == abnormal.shape
                changed = np.abs(normal.astype(int) - abnormal.astype(int)) >= 25
                visible += changed.sum() >= 10
            assert visible >= 5, (part, kind, visible)


def test_twins_differ_only_where_a_local_finding_is():
    normal, abnormal = render_twins("HUMERUS", "lesion", np.random.default_rng([0, 4]), 64)
    changed = np.abs(normal.astype(int) - abnormal.astype(int)) > 0
    assert 0 < changed.mean() < 0.1
    with pytest.raises(ValueError, match="needs a finding"):
        render_twins("HAND", None, np.random.default_rng(0), 64)


def test_twin_sheet(tmp_path):
    path = make_twin_sheet(tmp_path / "twins.png", size=32, zoom=2, seed=0)
    with Image.open(path) as im:
        assert im.mode == "L" and im.width > 2 * 64 * len(FINDINGS) and im.height > 64 * len(BODY_PARTS)

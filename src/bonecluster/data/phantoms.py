"""Synthetic bone radiographs ("phantoms") in MURA layout, the project's built-in data.

No real radiograph can be shipped, so the demo and the tests run on films drawn here.

Anatomy model
-------------
Every shape is a 2-D signed distance field (negative inside) evaluated on the pixel grid after
mapping it into a *body frame*: film coordinates where the film's long side is 1 unit, then
undone by the view's pose (scale, rotation, translation, mirror). Two primitives suffice:

* a **capsule** (a segment with a radius, optionally tapered): bone shafts, clavicle, ribs;
* an **ellipse**: epiphyses, condyles, carpals, the humeral head, lesions.

A **bone** is a smooth union of primitives (shaft capsule first, then its ends). Its cortex is
the band ``-cortex < d < 0`` just inside the outline and is drawn denser than the marrow inside
it, so the cortex reads as a bright rim around a greyer medulla, as on a real film. Soft tissue
is one smooth union of capsules and ellipses around the bones whose thickness rises smoothly
from its edge (a rounded limb), over a dark (air) background.

Parts are built from patient-level parameters (bone length, width, cortical thickness,
density, soft-tissue thickness) and view-level ones (projection, from frontal to lateral,
which stacks parallel bones, and joint flexion), so the views of one study share anatomy but
differ in projection and pose:

* FINGER: metacarpal head plus three phalanges in a chain;
* HAND: five rays (metacarpal plus two or three phalanges) fanning out from eight carpals,
  above the distal radius and ulna;
* WRIST: distal radius and ulna, the carpal cluster, the metacarpal bases;
* FOREARM: two long, nearly parallel bones (radius and ulna) from wrist to elbow;
* ELBOW: the distal humerus with its condyles meeting radius and ulna at an angle (carrying
  angle in frontal views, about 90 degrees of flexion in lateral views);
* HUMERUS: one long thick shaft with the head under the glenoid and the condyles below;
* SHOULDER: humeral head against the glenoid, scapula, acromion, clavicle and a few ribs.

Findings (abnormal studies show the same finding in every view) are applied to the anatomy
before drawing: a displaced **fracture** (a gap plus a shifted, angulated fragment that carries
the bones distal to it), a metal **plate** with screws (radio-opaque), a lytic **lesion** (a
dark, roughly round hole, sometimes expanding the bone, sometimes with a sclerotic rim) and a
**dislocation** (the bones beyond a joint shifted, pulled apart and turned).

Exposure: attenuation ``A`` is summed along the beam and mapped to brightness by
``1 - exp(-gain * A)`` (so overlaps add and metal saturates), then gamma, contrast, brightness,
a heel-effect ramp, collimation borders, blur, noise and burned-in letter markers vary per film.

Everything random for a study comes from ``np.random.default_rng([seed, stream, split, index])``
(a patient's anatomy from ``[seed, stream, split, patient]``), so the same seed gives the same
bytes whatever the number of worker processes, and a valid split never repeats train's films.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bonecluster import BODY_PARTS

__all__ = [
    "FINDINGS", "VIEWS", "LabelledFilm", "PhantomSummary", "StudyPlan", "generate_phantoms",
    "WHOLE_ARM_PARTS", "add_annotations", "add_growth_plates", "add_whole_arm", "check_annotations",
    "check_children", "check_framing", "check_part_finding_sizes", "check_texture", "check_whole_arm",
    "child_patient", "WHOLE_ARM_ZOOM", "FINDING_SIZE_FACTOR", "METACARPAL_FINDINGS", "FOREARM_BONE_FRACTURES",
    "demo_finding_rules",
    "make_contact_sheet", "make_twin_sheet", "plan_studies", "render_labelled",
    "render_phantom", "render_study", "render_twins", "reshare_film", "texture_field",
]

FINDINGS: tuple[str, ...] = ("fracture", "plate", "lesion", "dislocation")

# Independent random streams: the plan, each patient's anatomy, each study's views.
_PLAN_STREAM, _PATIENT_STREAM, _STUDY_STREAM, _SHEET_STREAM = 101, 202, 303, 404
_LABELLED_STREAM = 505  # single films with their labels, for pre-training (render_labelled)
_TEXTURE_STREAM = 707   # trabecular and soft-tissue texture (phantoms.texture), apart from the rest
_CHILD_STREAM = 808     # children's films with growth plates (phantoms.children), apart from the rest
_WHOLE_ARM_STREAM = 909  # whole-arm films (phantoms.whole_arm), apart from the rest
_ANNOTATION_STREAM = 1010  # extra burned-in tags, text and rulers (phantoms.annotations), apart from the rest

# Patients of a split other than train are numbered from here, so that studies of a train
# and a valid split written with the same seed never share a patient id.
_OTHER_SPLIT_FIRST_PATIENT = 90001

# Share of abnormal studies per part (MURA varies by part too); the mean is 0.40.
_ABNORMAL_SHARE = {"ELBOW": 0.40, "FINGER": 0.40, "FOREARM": 0.38, "HAND": 0.34,
                   "HUMERUS": 0.46, "SHOULDER": 0.44, "WRIST": 0.38}

# Finding mix per part, in FINDINGS order (fracture, plate, lesion, dislocation).
_FINDING_WEIGHTS = {
    "ELBOW": (0.35, 0.20, 0.15, 0.30), "FINGER": (0.35, 0.20, 0.15, 0.30),
    "FOREARM": (0.40, 0.35, 0.15, 0.10), "HAND": (0.40, 0.25, 0.15, 0.20),
    "HUMERUS": (0.35, 0.30, 0.20, 0.15), "SHOULDER": (0.30, 0.20, 0.15, 0.35),
    "WRIST": (0.40, 0.30, 0.10, 0.20),
}

# Film width / height. Ranges overlap so that the aspect ratio alone does not give the part
# away; above 1 the film is landscape. The long side is always ``size`` pixels.
_ASPECT = {"FINGER": (0.45, 0.72), "FOREARM": (0.45, 0.75), "HUMERUS": (0.50, 0.80),
           "HAND": (0.66, 0.92), "WRIST": (0.66, 0.95), "ELBOW": (0.70, 1.00),
           "SHOULDER": (0.85, 1.30)}

# Largest random rotation of the film (degrees); long narrow anatomy turns less.
_MAX_TURN = {"FINGER": 14, "FOREARM": 9, "HUMERUS": 9, "HAND": 14, "WRIST": 18,
             "ELBOW": 18, "SHOULDER": 14}

# How much of the film the anatomy fills on average (the hand model is drawn small).
_ZOOM = {"FINGER": 1.0, "FOREARM": 1.0, "HUMERUS": 1.0, "HAND": 1.25, "WRIST": 1.0,
         "ELBOW": 1.0, "SHOULDER": 1.0}

Point = tuple[float, float]


# ============================================================================ geometry


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum: a union of two distance fields with a fillet of size ``k``."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _add(p: Point, v: Point, s: float = 1.0) -> Point:
    return (p[0] + s * v[0], p[1] + s * v[1])


@dataclass(frozen=True)
class Rigid:
    """Rotate by ``angle`` (radians) about ``pivot``, then shift: moves fragments and joints."""

    angle: float = 0.0
    pivot: Point = (0.0, 0.0)
    shift: Point = (0.0, 0.0)

    def point(self, p: Point) -> Point:
        c, s = math.cos(self.angle), math.sin(self.angle)
        x, y = p[0] - self.pivot[0], p[1] - self.pivot[1]
        return (c * x - s * y + self.pivot[0] + self.shift[0],
                s * x + c * y + self.pivot[1] + self.shift[1])

    def halfplane(self, hp: tuple[float, float, float]) -> tuple[float, float, float]:
        """Move the half-plane ``nx*x + ny*y >= c`` with the fragment it clips."""
        nx, ny, c = hp
        cs, sn = math.cos(self.angle), math.sin(self.angle)
        n2 = (cs * nx - sn * ny, sn * nx + cs * ny)
        p0 = self.point((nx * c, ny * c))
        return (n2[0], n2[1], n2[0] * p0[0] + n2[1] * p0[1])


@dataclass(frozen=True)
class Capsule:
    """A segment ``a``-``b`` swept by a radius that tapers linearly from ``ra`` to ``rb``."""

    a: Point
    b: Point
    ra: float
    rb: float | None = None

    @property
    def r_end(self) -> float:
        return self.ra if self.rb is None else self.rb

    @property
    def length(self) -> float:
        return math.hypot(self.b[0] - self.a[0], self.b[1] - self.a[1])

    @property
    def direction(self) -> Point:
        n = self.length or 1e-9
        return ((self.b[0] - self.a[0]) / n, (self.b[1] - self.a[1]) / n)

    def at(self, t: float) -> Point:
        return (self.a[0] + t * (self.b[0] - self.a[0]), self.a[1] + t * (self.b[1] - self.a[1]))

    def radius_at(self, t: float) -> float:
        return self.ra + t * (self.r_end - self.ra)

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = self.b[0] - self.a[0], self.b[1] - self.a[1]
        px, py = x - self.a[0], y - self.a[1]
        t = np.clip((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        qx, qy = px - t * dx, py - t * dy
        return np.sqrt(qx * qx + qy * qy) - (self.ra + (self.r_end - self.ra) * t)

    def bounds(self) -> tuple[float, float, float, float]:
        r = max(self.ra, self.r_end)
        return (min(self.a[0], self.b[0]) - r, max(self.a[0], self.b[0]) + r,
                min(self.a[1], self.b[1]) - r, max(self.a[1], self.b[1]) + r)

    def moved(self, m: Rigid) -> "Capsule":
        return Capsule(m.point(self.a), m.point(self.b), self.ra, self.rb)

    def scaled(self, k: float, flip_y: bool = False) -> "Capsule":
        """The capsule ``k`` times as large about the origin, mirrored top to bottom (y -> -y) with ``flip_y``."""
        ky = -k if flip_y else k
        return Capsule((k * self.a[0], ky * self.a[1]), (k * self.b[0], ky * self.b[1]), k * self.ra,
                       None if self.rb is None else k * self.rb)


@dataclass(frozen=True)
class Ellipse:
    """Semi-axes ``rx`` (along the direction ``angle``) and ``ry`` (across it)."""

    c: Point
    rx: float
    ry: float
    angle: float = 0.0

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # First-order distance f / |grad f|: exact enough in the thin bands we draw.
        cs, sn = math.cos(self.angle), math.sin(self.angle)
        px, py = x - self.c[0], y - self.c[1]
        u = (px * cs + py * sn) / self.rx
        v = (py * cs - px * sn) / self.ry
        f = u * u + v * v - 1.0
        g = 2.0 * np.sqrt((u / self.rx) ** 2 + (v / self.ry) ** 2)
        return f / np.maximum(g, 1e-6)

    def bounds(self) -> tuple[float, float, float, float]:
        r = max(self.rx, self.ry)
        return (self.c[0] - r, self.c[0] + r, self.c[1] - r, self.c[1] + r)

    def moved(self, m: Rigid) -> "Ellipse":
        return Ellipse(m.point(self.c), self.rx, self.ry, self.angle + m.angle)

    def scaled(self, k: float, flip_y: bool = False) -> "Ellipse":
        """The ellipse ``k`` times as large about the origin, mirrored top to bottom with ``flip_y``."""
        if flip_y:
            return Ellipse((k * self.c[0], -k * self.c[1]), k * self.rx, k * self.ry, -self.angle)
        return Ellipse((k * self.c[0], k * self.c[1]), k * self.rx, k * self.ry, self.angle)


Prim = Union[Capsule, Ellipse]


def _union_bounds(boxes: Iterable[tuple[float, float, float, float]]) -> tuple[float, ...]:
    boxes = list(boxes)
    return (min(b[0] for b in boxes), max(b[1] for b in boxes),
            min(b[2] for b in boxes), max(b[3] for b in boxes))


# ============================================================================ anatomy


@dataclass(frozen=True)
class Bone:
    """A bone: a smooth union of primitives; ``prims[0]`` is the shaft when ``target > 0``.

    ``group`` names the rigid segment it belongs to (what a dislocation moves), ``distal`` the
    groups that travel with its far fragment when it breaks, ``target`` its weight as a
    fracture / plate / lesion site and ``t_range`` the visible stretch of its shaft.
    ``cuts`` are half-planes ``nx*x + ny*y >= c`` that clip a fracture fragment.
    """

    name: str
    prims: tuple[Prim, ...]
    cortex: float
    density: float = 1.0
    marrow: float = 0.5
    group: str = ""
    distal: tuple[str, ...] = ()
    target: float = 0.0
    t_range: tuple[float, float] = (0.2, 0.8)
    cuts: tuple[tuple[float, float, float], ...] = ()
    blend: float = 0.008

    @property
    def shaft(self) -> Capsule:
        return self.prims[0]

    @property
    def radius(self) -> float:
        return 0.5 * (self.shaft.ra + self.shaft.r_end)

    def moved(self, m: Rigid) -> "Bone":
        return replace(self, prims=tuple(p.moved(m) for p in self.prims),
                       cuts=tuple(m.halfplane(c) for c in self.cuts))

    def scaled(self, k: float, flip_y: bool = False) -> "Bone":
        """The bone ``k`` times as large about the origin (cortex and fillet too), mirrored top to
        bottom (y -> -y) with ``flip_y``."""
        sy = -1.0 if flip_y else 1.0
        return replace(self, prims=tuple(p.scaled(k, flip_y) for p in self.prims), cortex=k * self.cortex,
                       blend=k * self.blend, cuts=tuple((nx, sy * ny, k * c) for nx, ny, c in self.cuts))

    def bounds(self) -> tuple[float, ...]:
        return _union_bounds(p.bounds() for p in self.prims)


@dataclass(frozen=True)
class Blob:
    """One piece of the soft-tissue envelope, moving with bone group ``group``."""

    prim: Prim
    group: str = ""

    def moved(self, m: Rigid) -> "Blob":
        return Blob(self.prim.moved(m), self.group)


@dataclass(frozen=True)
class Joint:
    """Where a dislocation can happen: ``groups`` move about ``pivot``.

    ``axis`` points along the distal bone; ``shift``/``pull`` are the largest sideways and
    along-axis displacements and ``turn`` the largest rotation (degrees).
    """

    name: str
    pivot: Point
    axis: Point
    groups: tuple[str, ...]
    shift: float
    pull: float
    turn: float
    weight: float = 1.0


@dataclass(frozen=True)
class Hole:
    """A lytic lesion: bone attenuation inside ``shape`` drops by ``depth``; optional rim."""

    shape: Ellipse
    depth: float
    rim: float = 0.0
    rim_width: float = 0.0   # body units; at least 1.5 rendered pixels
    lesion: bool = True      # counted in the lesion mask (a growth plate is not)


@dataclass
class Anatomy:
    bones: list[Bone]
    tissue: list[Blob]
    joints: list[Joint]
    tissue_depth: float      # distance from the skin over which soft tissue reaches full thickness
    tissue_blend: float      # fillet between tissue pieces
    metal: list[tuple[Prim, float]] = field(default_factory=list)
    holes: list[Hole] = field(default_factory=list)

    def move_groups(self, groups: Sequence[str], m: Rigid) -> None:
        wanted = set(groups)
        self.bones = [b.moved(m) if b.group in wanted else b for b in self.bones]
        self.tissue = [t.moved(m) if t.group in wanted else t for t in self.tissue]

    def shifted(self, dx: float, dy: float) -> "Anatomy":
        m = Rigid(shift=(dx, dy))
        self.move_groups({b.group for b in self.bones} | {t.group for t in self.tissue}, m)
        self.joints = [replace(j, pivot=m.point(j.pivot)) for j in self.joints]
        return self


@dataclass(frozen=True)
class Patient:
    """Anatomy shared by every film of a patient (``seed`` drives per-part shape jitter)."""

    part: str
    seed: int
    length: float     # bone length factor
    thick: float      # bone width factor
    cortex: float     # cortical thickness as a fraction of the bone radius
    density: float    # cortex attenuation (low = osteopenic)
    marrow: float     # marrow attenuation relative to cortex
    tissue: float     # soft-tissue thickness factor
    tissue_mu: float  # soft-tissue attenuation

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


@dataclass(frozen=True)
class View:
    """One projection: ``proj`` 0 = frontal (PA/AP) ... 1 = lateral; ``flex`` 0..1."""

    proj: float
    flex: float
    label: str = "PA"


def sample_patient(part: str, rng: np.random.Generator) -> Patient:
    u = rng.uniform
    return Patient(part=part, seed=int(rng.integers(2**62)), length=u(0.92, 1.08),
                   thick=u(0.85, 1.18), cortex=u(0.24, 0.40), density=u(0.85, 1.15),
                   marrow=u(0.38, 0.58), tissue=u(0.85, 1.25), tissue_mu=u(0.24, 0.36))


def _bone(p: Patient, name: str, prims: Sequence[Prim], r: float, **kw) -> Bone:
    """A bone with this patient's cortex, density and marrow; ``r`` sets the cortex width."""
    kw.setdefault("group", name)
    density = kw.pop("density", 1.0) * p.density
    marrow = kw.pop("marrow", p.marrow)
    cortex = kw.pop("cortex", p.cortex) * r
    return Bone(name=name, prims=tuple(prims), cortex=cortex, density=density, marrow=marrow,
                blend=kw.pop("blend", 0.35 * r), **kw)


@dataclass(frozen=True)
class Seg:
    """One bone of a chain (finger rays): length and radii at base, shaft and head."""

    name: str
    length: float
    r_shaft: float
    r_base: float
    r_head: float
    target: float = 1.0


def _chain(p: Patient, start: Point, angle: float, segs: Sequence[Seg], bends: Sequence[float],
           gap: float) -> tuple[list[Bone], list[Joint], list[tuple[Point, Point]]]:
    """Bones laid end to end from ``start``; ``angle`` 0 points up the film (-y).

    ``bends[i]`` turns segment i relative to the previous one (radians). Each joint moves the
    segments after it, so a dislocation or a fracture carries the rest of the digit along.
    """
    bones, joints, axes = [], [], []
    pos = start
    for i, s in enumerate(segs):
        angle += bends[i]
        d = (math.sin(angle), -math.cos(angle))
        phi = math.atan2(d[1], d[0])
        end = _add(pos, d, s.length)
        base = Ellipse(_add(pos, d, 0.55 * s.r_base), 0.6 * s.r_base, s.r_base, phi)
        head = Ellipse(_add(end, d, -0.55 * s.r_head), 0.6 * s.r_head, s.r_head, phi)
        shaft = Capsule(_add(pos, d, 0.5 * s.r_base), _add(end, d, -0.5 * s.r_head), s.r_shaft)
        later = tuple(x.name for x in segs[i + 1:])
        bones.append(_bone(p, s.name, (shaft, base, head), s.r_shaft, distal=later,
                           target=s.target, t_range=(0.22, 0.78)))
        axes.append((pos, end))
        pos = _add(end, d, gap)
        if later:
            joints.append(Joint(later[0], _add(end, d, 0.5 * gap), d, later,
                                shift=2.2 * s.r_head, pull=1.6 * s.r_head, turn=30))
    return bones, joints, axes


def _jitter(rng: np.random.Generator, x: float, rel: float = 0.06) -> float:
    return x * (1.0 + rel * rng.uniform(-1.0, 1.0))


# ---------------------------------------------------------------------------- parts


def _build_finger(p: Patient, v: View) -> Anatomy:
    j = p.rng()
    L, T = p.length, p.thick
    segs = [Seg("mc", 0.34 * L, 0.046 * T, 0.05 * T, 0.060 * T, target=0.0),
            Seg("p1", _jitter(j, 0.30) * L, 0.037 * T, 0.054 * T, 0.046 * T),
            Seg("p2", _jitter(j, 0.19) * L, 0.031 * T, 0.046 * T, 0.040 * T),
            Seg("p3", _jitter(j, 0.13) * L, 0.025 * T, 0.038 * T, 0.032 * T)]
    curl = v.proj * (0.3 + 0.7 * v.flex)  # lateral films show the finger slightly flexed
    bends = [math.radians(j.uniform(-4, 4)), math.radians(j.uniform(-5, 5) + 12 * curl),
             math.radians(25 * curl), math.radians(15 * curl)]
    bones, joints, axes = _chain(p, (j.uniform(-0.02, 0.02), 0.74 * L), 0.0, segs, bends,
                                 gap=0.024 * L)
    radii = [0.14, 0.088, 0.080, 0.072]
    tissue = []
    for (a, b), s, r in zip(axes, segs, radii):
        r *= T * p.tissue
        if s.name == "p3":  # the pulp reaches beyond the tuft
            b = _add(b, Capsule(a, b, r).direction, 0.25 * r)
        tissue.append(Blob(Capsule(a, b, r, 0.9 * r if s.name == "p3" else r), s.name))
    return Anatomy(bones, tissue, joints, tissue_depth=0.035, tissue_blend=0.03)


# Rays 2-5 of the hand: base x, base y, fan angle (deg), lengths (mc, p1, p2, p3).
_HAND_RAYS = ((-0.046, 0.236, -9.0, (0.205, 0.125, 0.075, 0.055)),
              (-0.014, 0.229, -2.0, (0.195, 0.135, 0.085, 0.060)),
              (0.018, 0.233, 5.0, (0.180, 0.125, 0.080, 0.055)),
              (0.049, 0.243, 12.0, (0.165, 0.100, 0.060, 0.050)))
_HAND_RADII = ((0.0125, 0.019, 0.018), (0.011, 0.0165, 0.014), (0.0095, 0.0140, 0.012),
               (0.0080, 0.0120, 0.0105))
# Carpals: name, x, y, rx, ry, angle (deg), for the hand film.
_HAND_CARPALS = (
    ("scaphoid", -0.058, 0.330, 0.030, 0.019, 55), ("lunate", -0.013, 0.338, 0.021, 0.020, 0),
    ("triquetrum", 0.031, 0.331, 0.019, 0.017, -20), ("pisiform", 0.046, 0.320, 0.012, 0.012, 0),
    ("trapezium", -0.076, 0.283, 0.019, 0.017, 30), ("trapezoid", -0.044, 0.272, 0.015, 0.016, 0),
    ("capitate", -0.013, 0.280, 0.026, 0.017, 90), ("hamate", 0.026, 0.280, 0.020, 0.020, 0))


def _carpals(p: Patient, table, squash: float, scale: float = 1.0) -> list[Bone]:
    """Carpal bones: cancellous, so a thin cortex and a denser inside than long-bone marrow."""
    bones = []
    for name, x, y, rx, ry, ang in table:
        e = Ellipse((x * squash, y), rx * scale * p.thick, ry * scale * p.thick, math.radians(ang))
        bones.append(_bone(p, name, (e,), min(e.rx, e.ry), group="carpus", cortex=0.22,
                           marrow=min(0.75, p.marrow + 0.15), density=0.9))
    return bones


def _build_hand(p: Patient, v: View) -> Anatomy:
    j = p.rng()
    L, T = p.length, p.thick
    squash = 1.0 - 0.72 * v.proj  # a lateral film stacks the rays on top of each other
    curl = math.radians(v.proj * (8 + 14 * v.flex))
    spread = j.uniform(0.7, 1.3)
    bones, joints, tissue = [], [], []
    for i, (x0, y0, fan, lens) in enumerate(_HAND_RAYS):
        names = [f"r{i + 2}{k}" for k in ("mc", "p1", "p2", "p3")]
        segs = [Seg(n, _jitter(j, ln) * L, *(r * T for r in rad), target=(2.0 if k == 0 else 0.6))
                for k, (n, ln, rad) in enumerate(zip(names, lens, _HAND_RADII))]
        angle = math.radians(fan * spread * (1.0 - 0.7 * v.proj) + j.uniform(-2, 2))
        b, jt, axes = _chain(p, (x0 * squash, y0), angle, segs, (0.0, curl, 1.3 * curl, 0.8 * curl),
                             gap=0.012 * L)
        bones += b
        joints += jt
        tissue += [Blob(Capsule(a, e, 0.026 * T * p.tissue), n) for (a, e), n in zip(axes[1:], names[1:])]
    bones, joints, tissue = _add_thumb(p, j, v, squash, bones, joints, tissue)
    bones += _carpals(p, _HAND_CARPALS, 1.0 - 0.5 * v.proj)
    bones += _distal_forearm(p, squash, y_end=0.40, r_radius=0.027 * T, r_ulna=0.018 * T, flare=0.05 * T)
    tissue += [Blob(Ellipse((-0.01 * squash, 0.16), 0.15, 0.105 * (0.55 + 0.45 * squash) * p.tissue + 0.01,
                            math.pi / 2)),
               Blob(Capsule((0.0, 0.9), (0.0, 0.30), 0.10 * p.tissue * (0.6 + 0.4 * squash)))]
    return Anatomy(bones, tissue, joints, tissue_depth=0.028, tissue_blend=0.03).shifted(0.0, -0.03)


def _add_thumb(p, j, v, squash, bones, joints, tissue):
    T, L = p.thick, p.length
    names = ("r1mc", "r1p1", "r1p3")
    lens = (_jitter(j, 0.13) * L, _jitter(j, 0.09) * L, _jitter(j, 0.065) * L)
    radii = ((0.014, 0.020, 0.018), (0.012, 0.017, 0.015), (0.0095, 0.014, 0.011))
    segs = [Seg(n, ln, *(r * T for r in rad), target=(1.5 if n == "r1mc" else 0.6))
            for n, ln, rad in zip(names, lens, radii)]
    angle = math.radians(-(42 - 20 * v.proj) + j.uniform(-5, 5))
    b, jt, axes = _chain(p, (-0.078 * squash, 0.262), angle, segs, (0.0, 0.15, 0.1), gap=0.012 * L)
    tissue = tissue + [Blob(Capsule(a, e, 0.03 * T * p.tissue), n) for (a, e), n in zip(axes, names)]
    return bones + b, joints + jt, tissue


def _distal_forearm(p: Patient, squash: float, y_end: float, r_radius: float, r_ulna: float,
                    flare: float) -> list[Bone]:
    """Distal radius (flared) and ulna entering from the bottom edge (hand film)."""
    xr, xu = -0.035 * squash, 0.045 * (1.0 - 0.8 * (1.0 - squash))
    radius = _bone(p, "radius", (Capsule((xr, 0.80), (xr, y_end + 0.02), r_radius),
                                 Ellipse((xr - 0.004, y_end), flare, 0.45 * flare, math.radians(-8))),
                   r_radius, target=0.3, t_range=(0.6, 0.92))
    ulna = _bone(p, "ulna", (Capsule((xu, 0.80), (xu, y_end + 0.02), r_ulna),
                             Ellipse((xu, y_end + 0.01), 1.1 * r_ulna, r_ulna)),
                 r_ulna, target=0.15, t_range=(0.6, 0.9))
    return [radius, ulna]


# Wrist film carpals (the scaphoid is a capsule, drawn apart so that it can break).
_WRIST_CARPALS = (
    ("lunate", -0.012, 0.004, 0.045, 0.042, 0), ("triquetrum", 0.074, -0.008, 0.040, 0.035, -20),
    ("pisiform", 0.100, -0.030, 0.026, 0.026, 0), ("trapezium", -0.140, -0.105, 0.040, 0.036, 30),
    ("trapezoid", -0.076, -0.126, 0.032, 0.035, 0), ("capitate", -0.010, -0.115, 0.056, 0.037, 90),
    ("hamate", 0.070, -0.108, 0.044, 0.042, 0))


def _build_wrist(p: Patient, v: View) -> Anatomy:
    j = p.rng()
    T = p.thick
    sq = 1.0 - 0.55 * v.proj
    sq_ulna = 1.0 - 0.85 * v.proj  # the ulna hides behind the radius in a lateral film
    tilt = math.radians(j.uniform(-14, -6))
    rr = 0.052 * T
    radius = _bone(p, "radius", (Capsule((-0.06 * sq, 0.80), (-0.055 * sq, 0.16), rr, 1.05 * rr),
                                 Ellipse((-0.055 * sq, 0.10), 0.105 * T * (1 - 0.35 * v.proj), 0.045 * T,
                                         tilt),
                                 Ellipse((-0.145 * sq, 0.085), 0.028 * T, 0.022 * T, math.radians(70))),
                   rr, target=3.0, t_range=(0.55, 0.9))
    ru = 0.033 * T
    xu = 0.11 * sq_ulna
    ulna = _bone(p, "ulna", (Capsule((xu, 0.80), (xu, 0.15), ru),
                             Ellipse((xu, 0.125), 0.042 * T, 0.038 * T),
                             Ellipse((xu + 0.025, 0.092), 0.016 * T, 0.022 * T)),
                 ru, target=1.0, t_range=(0.55, 0.9))
    scaphoid = _bone(p, "scaphoid", (Capsule((-0.135 * sq, 0.025), (-0.075 * sq, -0.045), 0.032 * T),),
                     0.032 * T, group="carpus", target=0.6, t_range=(0.35, 0.65), cortex=0.22,
                     marrow=min(0.75, p.marrow + 0.15), density=0.9)
    bones = [radius, ulna, scaphoid] + _carpals(p, _WRIST_CARPALS, sq, scale=1.0)
    bones += _metacarpal_bases(p, sq)
    joints = [Joint("radiocarpal", (-0.02, 0.055), (0.0, -1.0), ("carpus", "mc"), shift=0.09,
                    pull=0.07, turn=20, weight=2.0),
              Joint("druj", (xu, 0.13), (0.0, -1.0), ("ulna",), shift=0.05, pull=0.03, turn=6)]
    w = (0.2 + 0.02 * T) * p.tissue * (1.0 - 0.2 * v.proj)
    tissue = [Blob(Capsule((-0.01, 0.9), (-0.01, 0.0), w, 1.05 * w)),
              Blob(Capsule((-0.01, 0.0), (-0.02, -0.9), 1.05 * w, 1.2 * w), "mc")]
    return Anatomy(bones, tissue, joints, tissue_depth=0.07, tissue_blend=0.05)


def _metacarpal_bases(p: Patient, sq: float) -> list[Bone]:
    T = p.thick
    bases = ((-0.175, -0.175, -32.0), (-0.085, -0.195, -6.0), (-0.015, -0.205, 0.0),
             (0.052, -0.195, 5.0), (0.108, -0.180, 11.0))
    bones = []
    for i, (x, y, ang) in enumerate(bases):
        r = (0.028 if i == 0 else 0.025) * T
        d = (math.sin(math.radians(ang)), -math.cos(math.radians(ang)))
        a = (x * sq, y)
        shaft = Capsule(_add(a, d, 0.02), _add(a, d, 0.5), r, 0.9 * r)
        base = Ellipse(_add(a, d, 0.02), 0.022 * T, 0.036 * T, math.atan2(d[1], d[0]))
        bones.append(_bone(p, f"mc{i + 1}", (shaft, base), r, group="mc", target=0.5,
                           t_range=(0.1, 0.45)))
    return bones


def _build_forearm(p: Patient, v: View) -> Anatomy:
    j = p.rng()
    T = p.thick
    sq = 1.0 - 0.6 * v.proj
    tilt = j.uniform(-0.02, 0.02)  # how far the two bones converge towards the elbow
    rr, ru = 0.032 * T, 0.029 * T
    radius = _bone(p, "radius", (Capsule((-0.085 * sq, -0.41), ((-0.045 + tilt) * sq, 0.40), rr, 0.8 * rr),
                                 Ellipse((-0.085 * sq, -0.445), 0.07 * T, 0.03 * T),
                                 Ellipse((-0.043 * sq, 0.425), 0.03 * T, 0.02 * T)),
                   rr, target=2.0, t_range=(0.15, 0.85))
    ulna = _bone(p, "ulna", (Capsule((0.075 * sq, -0.42), (0.055 * sq, 0.40), 0.7 * ru, 1.1 * ru),
                             Ellipse((0.075 * sq, -0.445), 0.024 * T, 0.022 * T),
                             Ellipse((0.06 * sq, 0.45), 0.04 * T, 0.06 * T)),
                 ru, target=2.0, t_range=(0.15, 0.85))
    # Neighbours cut off by the film edges: the carpal row above, the humeral condyles below.
    edges = [_bone(p, f"edge{i}", (Ellipse((x * sq, y), rx * T, ry * T),), 0.03 * T)
             for i, (x, y, rx, ry) in enumerate(((-0.075, -0.55, 0.042, 0.032), (-0.005, -0.56, 0.036, 0.034),
                                                 (0.06, -0.55, 0.034, 0.03), (0.0, 0.58, 0.14, 0.06)))]
    joints = [Joint("radial head", (-0.085 * sq, -0.42), (0.0, 1.0), ("radius",), shift=0.03,
                    pull=0.02, turn=11, weight=2.0),
              Joint("druj", (0.055 * sq, 0.40), (0.0, -1.0), ("ulna",), shift=0.04, pull=0.02, turn=7)]
    w = 0.15 * p.tissue * (1.0 - 0.2 * v.proj)
    tissue = [Blob(Capsule((0.0, -0.75), (0.0, 0.75), 0.85 * w, 1.1 * w))]
    return Anatomy([radius, ulna] + edges, tissue, joints, tissue_depth=0.07, tissue_blend=0.05)


def _build_elbow(p: Patient, v: View) -> Anatomy:
    j = p.rng()
    T = p.thick
    sq = 1.0 - 0.5 * v.proj
    rh = 0.058 * T
    humerus = _bone(p, "humerus", (Capsule((0.0, -0.8), (0.0, -0.07), rh, 1.08 * rh),
                                   Ellipse((0.0, -0.015), 0.15 * T * (1 - 0.45 * v.proj), 0.055 * T),
                                   Ellipse((-0.07 * sq, 0.03), 0.045 * T, 0.04 * T),
                                   Ellipse((0.045 * sq, 0.032), 0.05 * T, 0.04 * T)),
                    rh, target=2.0, t_range=(0.55, 0.92))
    pivot = (0.0, 0.075)
    forearm = _elbow_forearm(p, sq, pivot)
    # Frontal films show the carrying angle; lateral ones the elbow bent near 90 degrees.
    flex = math.radians(j.uniform(5, 15) + v.proj * (65 + 25 * v.flex))
    m = Rigid(angle=flex, pivot=pivot)
    forearm = [b.moved(m) for b in forearm]
    axis = Rigid(angle=flex).point((0.0, 1.0))
    w = 0.15 * p.tissue
    tissue = [Blob(Capsule((0.0, -0.9), (0.0, 0.0), w, 1.05 * w)),
              Blob(Capsule(pivot, m.point((0.0, 0.9)), 0.95 * w, 0.85 * w), "forearm")]
    joints = [Joint("elbow", pivot, axis, ("ulna", "radius", "forearm"), shift=0.12, pull=0.07,
                    turn=22, weight=2.0),
              Joint("radial head", m.point((-0.065 * sq, 0.04)), axis, ("radius",), shift=0.07,
                    pull=0.04, turn=8)]
    an = Anatomy([humerus] + forearm, tissue, joints, tissue_depth=0.07, tissue_blend=0.08)
    # Keep the elbow in view when the forearm swings sideways.
    return an.shifted(0.2 * math.sin(flex), -0.08 * math.sin(flex))


def _elbow_forearm(p: Patient, sq: float, pivot: Point) -> list[Bone]:
    """Ulna and radius hanging straight down from the elbow, before flexion."""
    T = p.thick
    px, py = pivot
    ru, rr = 0.034 * T, 0.026 * T
    ulna = _bone(p, "ulna", (Capsule((px + 0.035 * sq, py + 0.03), (px + 0.03 * sq, py + 0.8), ru, 0.75 * ru),
                             Ellipse((px + 0.035 * sq, py - 0.045), 0.04 * T, 0.062 * T),
                             Ellipse((px + 0.035 * sq, py + 0.03), 0.045 * T, 0.04 * T)),
                 ru, target=1.0, t_range=(0.08, 0.45))
    radius = _bone(p, "radius", (Capsule((px - 0.065 * sq, py + 0.05), (px - 0.078 * sq, py + 0.8),
                                         0.85 * rr, 1.15 * rr),
                                 Ellipse((px - 0.065 * sq, py + 0.035), 0.022 * T, 0.045 * T),
                                 Ellipse((px - 0.058 * sq, py + 0.14), 0.022 * T, 0.018 * T)),
                   rr, target=1.0, t_range=(0.08, 0.45))
    return [ulna, radius]


def _build_humerus(p: Patient, v: View) -> Anatomy:
    j = p.rng()
    T = p.thick
    rh = 0.05 * T
    tub_x = -0.085 + 0.06 * v.proj  # the greater tuberosity turns inward on rotated views
    humerus = _bone(p, "humerus", (Capsule((0.0, -0.33), (0.015, 0.37), rh, 0.9 * rh),
                                   Ellipse((-0.005, -0.415), 0.105 * T, 0.10 * T),
                                   Ellipse((tub_x, -0.385), 0.05 * T, 0.045 * T),
                                   Ellipse((0.015, 0.445), 0.12 * T * (1 - 0.4 * v.proj), 0.045 * T)),
                    rh, target=3.0, t_range=(0.12, 0.88))
    # Above and beside the head: glenoid, the scapula's lateral border and the acromion.
    gx = 0.118 + j.uniform(-0.01, 0.01)
    scapula = _bone(p, "scapula", (Ellipse((gx, -0.415), 0.026 * T, 0.085 * T),
                                   Capsule((gx + 0.01, -0.36), (gx + 0.17, -0.02), 0.02 * T),
                                   Capsule((-0.06, -0.535), (0.18, -0.515), 0.028 * T)),
                    0.03 * T, density=0.85)
    blade = _bone(p, "blade", (Ellipse((gx + 0.17, -0.28), 0.11, 0.2, math.radians(60)),),
                  0.04, density=0.35, marrow=0.6, group="scapula")
    w = 0.17 * p.tissue
    tissue = [Blob(Capsule((0.0, -0.55), (0.01, 0.7), w, 0.85 * w)),
              Blob(Ellipse((0.2, -0.42), 0.3, 0.22))]
    # Anterior dislocation: the head slips medially and down, under the glenoid.
    joints = [Joint("glenohumeral", (-0.005, -0.415), (0.45, 0.89), ("humerus",), shift=0.04,
                    pull=0.17, turn=8)]
    return Anatomy([blade, scapula, humerus], tissue, joints, tissue_depth=0.09, tissue_blend=0.08)


def _build_shoulder(p: Patient, v: View) -> Anatomy:
    j = p.rng()
    T = p.thick
    hx = -0.14 + 0.08 * v.proj  # scapular-Y views put the head over the glenoid
    rh = 0.062 * T
    humerus = _bone(p, "humerus", (Capsule((hx - 0.03, 0.06), (hx - 0.06, 0.75), rh, 0.92 * rh),
                                   Ellipse((hx, 0.0), 0.13 * T, 0.13 * T),
                                   Ellipse((hx - 0.11 * T, -0.02), 0.055 * T, 0.07 * T)),
                    rh, target=1.5, t_range=(0.05, 0.45))
    narrow = 1.0 - 0.6 * v.proj
    scapula = _bone(p, "scapula", (Ellipse((0.03, 0.0), 0.032 * T, 0.10 * T),
                                   Capsule((0.06, 0.09), (0.17, 0.5), 0.024 * T),
                                   Capsule((-0.03, -0.13), (0.45, -0.06), 0.022 * T),
                                   Capsule((-0.21, -0.18), (0.0, -0.15), 0.032 * T),
                                   Capsule((0.11, -0.085), (0.025, -0.06), 0.02 * T)),
                    0.028 * T, density=0.9, blend=0.012)
    blade = _bone(p, "blade", (Ellipse((0.2, 0.18), 0.15 * narrow, 0.28, math.radians(75)),),
                  0.05, density=0.35, marrow=0.6, group="scapula")
    clav_mid = (0.17, -0.27 + j.uniform(-0.02, 0.02))
    clavicle = _bone(p, "clavicle", (Capsule((-0.13, -0.215), clav_mid, 0.03 * T),
                                     Capsule(clav_mid, (0.55, -0.2), 0.03 * T, 0.036 * T),
                                     Ellipse((-0.135, -0.215), 0.022 * T, 0.034 * T)),
                     0.03 * T, target=1.5, t_range=(0.3, 0.9))
    ribs = _ribs(p, j)
    tissue = [Blob(Ellipse((-0.1, 0.1), 0.55, 0.33, math.pi / 2)),
              Blob(Ellipse((0.4, 0.25), 0.6, 0.5, math.pi / 2)),
              Blob(Capsule((0.0, -0.3), (0.6, -0.45), 0.14))]
    joints = [Joint("glenohumeral", (hx, 0.0), (0.5, 0.866), ("humerus",), shift=0.06, pull=0.19,
                    turn=14, weight=3.0),
              Joint("acromioclavicular", (-0.13, -0.215), (0.0, -1.0), ("clavicle",), shift=0.02,
                    pull=0.08, turn=6)]
    return Anatomy([blade, *ribs, scapula, humerus, clavicle], tissue, joints, tissue_depth=0.12,
                   tissue_blend=0.1)


def _ribs(p: Patient, j: np.random.Generator) -> list[Bone]:
    ribs = []
    y0 = j.uniform(-0.12, -0.06)
    for i in range(4):
        y = y0 + 0.15 * i
        mid = (0.42, y - 0.03)
        ribs.append(_bone(p, f"rib{i}", (Capsule((0.26, y + 0.06), mid, 0.013),
                                          Capsule(mid, (0.75, y + 0.03), 0.013)),
                          0.013, density=0.6, group="ribs"))
    return ribs


_BUILDERS = {"FINGER": _build_finger, "HAND": _build_hand, "WRIST": _build_wrist,
             "FOREARM": _build_forearm, "ELBOW": _build_elbow, "HUMERUS": _build_humerus,
             "SHOULDER": _build_shoulder}


def build_anatomy(patient: Patient, view: View) -> Anatomy:
    return _BUILDERS[patient.part](patient, view)


# ============================================================================ findings


@dataclass(frozen=True)
class Fracture:
    """Sizes are multiples of the bone radius; angles in radians."""

    bone: int
    t: float          # where along the shaft
    tilt: float       # obliquity of the fracture line
    gap: float
    shift: float      # sideways displacement of the far fragment (signed)
    slide: float      # overlap (+) or distraction (-) along the shaft
    turn: float       # angulation
    swelling: float   # soft-tissue swelling radius (0: none)


@dataclass(frozen=True)
class Plate:
    bone: int
    t: float
    length: float     # fraction of the shaft
    side: int
    thick: float
    screws: int
    mu: float         # metal attenuation: far above bone, so it saturates
    screw_r: float
    screw_tilt: float
    fracture: Fracture | None


@dataclass(frozen=True)
class Lesion:
    bone: int
    t: float
    across: float
    along: float
    offset: float
    depth: float
    rim: float
    satellites: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Dislocation:
    joint: int
    shift: float      # signed fraction of the joint's largest shift
    pull: float
    turn: float
    swelling: float


FindingSpec = Union[Fracture, Plate, Lesion, Dislocation]


def _pick(rng: np.random.Generator, weights: Sequence[float]) -> int:
    w = np.asarray(weights, dtype=float)
    return int(rng.choice(len(w), p=w / w.sum()))


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def sample_finding(kind: str | None, part: str, anatomy: Anatomy,
                   rng: np.random.Generator, part_rules: bool = True) -> tuple[FindingSpec, ...]:
    """Draw the finding's parameters once per study (every view shows the same lesion).

    The site is drawn again (up to ``_SITE_TRIES`` times) while it falls outside the box that
    every view of the part shows (:func:`_shown_box`), so a finding is never cut off the film.
    ``part_rules`` applies :data:`METACARPAL_FINDINGS` and :data:`FOREARM_BONE_FRACTURES` (the demo's
    phantoms); without it every part draws its findings alike (the pre-training films' default).
    """
    if kind is None:
        return ()
    half_w, half_h = _shown_box(part)
    for _ in range(_SITE_TRIES):
        specs = _draw_finding(kind, part, anatomy, rng, metacarpal=part_rules and part in METACARPAL_FINDINGS,
                              forearm_bones=part_rules and part in FOREARM_BONE_FRACTURES)
        if all(abs(x) <= half_w and abs(y) <= half_h for x, y in (_site(anatomy, s) for s in specs)):
            break
    return specs


_SITE_TRIES = 20
_SITE_MARGIN_PX = 4.0   # reference pixels between a finding's site and the edge of a typical film


def _shown_box(part: str) -> tuple[float, float]:
    """Half width and half height, in body units, of the centred box a typical film of the part
    shows (the middle of its aspect range, its usual zoom) less a margin of ``_SITE_MARGIN_PX``:
    a site inside it is on the film in nearly every view (shutters, shifts and turns move the
    edges by a few pixels)."""
    lo, hi = _ASPECT[part]
    aspect = 0.5 * (lo + hi)
    width, height = min(aspect, 1.0), min(1.0, 1.0 / aspect)   # the long side is 1
    margin = _ref_px(_SITE_MARGIN_PX)
    return 0.5 * width / _ZOOM[part] - margin, 0.5 * height / _ZOOM[part] - margin


def _site(anatomy: Anatomy, spec: FindingSpec) -> Point:
    """Where a finding is, in the reference view's body frame."""
    if isinstance(spec, Dislocation):
        return anatomy.joints[spec.joint].pivot
    return anatomy.bones[spec.bone].shaft.at(spec.t)


def _draw_finding(kind: str, part: str, anatomy: Anatomy, rng: np.random.Generator,
                  metacarpal: bool = False, forearm_bones: bool = False) -> tuple[FindingSpec, ...]:
    """One finding's specs; ``metacarpal``: the fracture or dislocation sits at a metacarpal and
    always swells (:data:`METACARPAL_FINDINGS`); ``forearm_bones``: a fracture breaks the radius or
    the ulna (:data:`FOREARM_BONE_FRACTURES`)."""
    if kind == "dislocation":
        dislocation = _sample_dislocation(anatomy, rng, at_metacarpal_head=metacarpal)
        return (_swollen(dislocation, rng, 2.5, 3.5) if metacarpal else dislocation,)
    if kind == "fracture":
        weights = [b.target if (not metacarpal or _is_metacarpal(b.name))
                   and (not forearm_bones or b.name in ("radius", "ulna")) else 0.0 for b in anatomy.bones]
        if not any(weights):   # a part put in METACARPAL_FINDINGS or FOREARM_BONE_FRACTURES without such bones
            raise ValueError(f"{part}: no bone of this film can carry the fracture its site rules ask for "
                             f"(metacarpal={metacarpal}, forearm_bones={forearm_bones})")
        bone = _pick(rng, weights)
        first = _sample_fracture(anatomy.bones[bone], bone, rng)
        if metacarpal:
            first = _swollen(first, rng, 2.5, 4.0)
        return (first,) + _second_fracture(part, anatomy, bone, first, rng)
    bone = _pick(rng, [b.target for b in anatomy.bones])
    if kind == "plate":
        return (_sample_plate(anatomy.bones[bone], bone, rng),)
    return (_sample_lesion(anatomy.bones[bone], bone, rng),)


def _sample_fracture(b: Bone, index: int, rng: np.random.Generator, mild: bool = False) -> Fracture:
    t0, t1 = b.t_range
    scale = 0.35 if mild else 1.0
    return Fracture(bone=index, t=rng.uniform(t0, t1), tilt=math.radians(rng.uniform(-40, 40)),
                    gap=rng.uniform(0.25, 0.6) * (0.6 if mild else 1.0),
                    shift=_sign(rng) * rng.uniform(0.6, 1.6) * scale,
                    slide=rng.uniform(-0.6, 1.0) * scale,
                    turn=_sign(rng) * math.radians(rng.uniform(5, 22)) * scale,
                    swelling=0.0 if mild or rng.random() < 0.4 else rng.uniform(2.5, 4.0))


def _second_fracture(part, anatomy, first_bone, first, rng) -> tuple[Fracture, ...]:
    """Forearm injuries often break both bones at about the same level."""
    if part != "FOREARM" or rng.random() > 0.4:
        return ()
    others = [i for i, b in enumerate(anatomy.bones) if b.target > 0 and i != first_bone]
    i = others[int(rng.integers(len(others)))]
    second = _sample_fracture(anatomy.bones[i], i, rng)
    lo, hi = anatomy.bones[i].t_range
    return (replace(second, t=float(np.clip(first.t + rng.uniform(-0.08, 0.08), lo, hi))),)


def _sample_plate(b: Bone, index: int, rng: np.random.Generator) -> Plate:
    t0, t1 = b.t_range
    length = min(rng.uniform(0.35, 0.65), (t1 - t0) + 0.15)
    t = rng.uniform(t0 + 0.4 * length, t1 - 0.4 * length) if t1 - t0 > 0.8 * length else 0.5 * (t0 + t1)
    fracture = _sample_fracture(b, index, rng, mild=True) if rng.random() < 0.6 else None
    if fracture is not None:
        fracture = replace(fracture, t=t + rng.uniform(-0.1, 0.1) * length)
    return Plate(bone=index, t=t, length=length, side=int(_sign(rng)), thick=rng.uniform(0.35, 0.6),
                 screws=int(rng.integers(3, 8)), mu=rng.uniform(2.5, 6.0),
                 screw_r=rng.uniform(0.12, 0.2), screw_tilt=math.radians(rng.uniform(-10, 10)),
                 fracture=fracture)


def _sample_lesion(b: Bone, index: int, rng: np.random.Generator) -> Lesion:
    t0, t1 = b.t_range
    n_sat = 0 if rng.random() < 0.7 else int(rng.integers(1, 3))  # moth-eaten: a few small holes
    sats = tuple((float(_sign(rng) * rng.uniform(0.06, 0.15)), float(rng.uniform(0.4, 0.7)))
                 for _ in range(n_sat))
    return Lesion(bone=index, t=rng.uniform(t0, t1), across=rng.uniform(0.8, 1.6),
                  along=rng.uniform(1.4, 3.0), offset=rng.uniform(-0.3, 0.3),
                  depth=rng.uniform(0.75, 0.98), rim=rng.uniform(0.2, 0.5) if rng.random() < 0.4 else 0.0,
                  satellites=sats)


def _sample_dislocation(anatomy: Anatomy, rng: np.random.Generator, at_metacarpal_head: bool = False) -> Dislocation:
    joint = _pick(rng, [jt.weight if not at_metacarpal_head or _is_metacarpal_head(jt.name) else 0.0
                        for jt in anatomy.joints])
    return Dislocation(joint=joint, shift=_sign(rng) * rng.uniform(0.55, 1.0),
                       pull=rng.uniform(0.3, 1.0), turn=_sign(rng) * rng.uniform(0.3, 1.0),
                       swelling=0.0 if rng.random() < 0.5 else rng.uniform(2.5, 3.5))


def _is_metacarpal(bone_name: str) -> bool:
    return bone_name.endswith("mc")          # the hand's r1mc-r5mc


def _is_metacarpal_head(joint_name: str) -> bool:
    return joint_name.endswith("p1")         # a digit's joints are named by the bone they move: MCP moves p1


def _swollen(spec: Fracture | Dislocation, rng: np.random.Generator, low: float, high: float):
    """``spec`` with soft-tissue swelling: its own, or a new factor drawn from [``low``, ``high``),
    the range its sampler draws from when it swells."""
    return spec if spec.swelling else replace(spec, swelling=rng.uniform(low, high))


def apply_finding(anatomy: Anatomy, specs: Sequence[FindingSpec], least: float = 1.0) -> Anatomy:
    """``specs`` drawn into ``anatomy``; ``least`` multiplies every minimum size (the part's
    :data:`FINDING_SIZE_FACTOR`)."""
    for spec in specs:
        if isinstance(spec, Fracture):
            _apply_fracture(anatomy, spec, least=least)
        elif isinstance(spec, Plate):
            _apply_plate(anatomy, spec, least)
        elif isinstance(spec, Lesion):
            _apply_lesion(anatomy, spec, least)
        else:
            _apply_dislocation(anatomy, spec, least)
    return anatomy


# Issue 24: every finding has a minimum size on the demo's 64-px thumbnail, so that a reader (and
# a supervised model, benchmarks/bench_findings.py) can see it there; normal films are untouched.
# Sizes are in pixels of a film whose long side is FINDING_REFERENCE_PX: one pixel is 1/64 of
# the film's long side, in body units (a film squashed to a square only stretches its short side).
# They are the issue's examples, times a factor per part (FINDING_SIZE_FACTOR). Twice these on
# every part lifted the supervised CNN yardstick but made stage 1 split the long bones (FOREARM,
# HUMERUS) into normal and abnormal (0.856 on demo seed 1 against 1.000), so the long bones keep
# the examples; on the other five parts, where the examples left fractures and dislocations near
# chance for a supervised model, three times them lifted the CNN yardstick from 0.806 / 0.830 to
# 0.926 / 0.917 on demo seeds 0 / 1 with stage 1 at >= 0.99 (rule PP; docs/BENCHMARKS.md, "The
# phantom findings' yardstick").
FINDING_REFERENCE_PX = 64
MIN_FRACTURE_GAP_PX = 2.0      # the dark line between the fragments
MIN_FRACTURE_STEP_PX = 2.0     # sideways step of the far fragment
MIN_FRACTURE_TURN_DEG = 12.0   # angulation
MIN_PLATE_THICK_PX = 1.5       # the plate's width; metal attenuation saturates (burns white)
MIN_SCREW_PX = 1.0             # a screw's width
MIN_LESION_PX = 4.0            # the lytic hole's short diameter
MIN_RIM_PX = 1.0               # its sclerotic rim, which every lesion now has
MIN_RIM_DENSITY = 0.4          # the rim's added attenuation (a cortex adds 0.85-1.15)
MIN_DISLOCATION_PX = 3.0       # how far the joint's distal side moves (sideways and apart)
# Each part's minimum sizes are the ones above times its factor (the angulation too).
FINDING_SIZE_FACTOR = {"ELBOW": 3.0, "FINGER": 3.0, "FOREARM": 1.0, "HAND": 3.0, "HUMERUS": 1.0,
                       "SHOULDER": 3.0, "WRIST": 3.0}
# On a 64-px hand film a phalanx is 1-2 px wide: a broken one at three times the examples swung
# the rest of its digit like a fanned or flexed finger, and a dislocated fingertip flew off as a
# 2-px fleck, so a supervised model hardly told them from normal hands (HOG 0.56-0.75). In these
# parts a fracture breaks a metacarpal, a dislocation is at a metacarpal head (MCP), and both
# always swell, as most acute hand injuries do: HOG on HAND 0.80 / 0.71 -> 0.88 / 0.81 on phantom
# seeds 0 / 1, the supervised CNN 0.68 / 0.75 -> 0.74 / 0.88 on two demo runs, stage 1 still >= 0.99
# (rule HD; docs/BENCHMARKS.md). Plates and lesions keep every site. The sites are found by the
# hand film's names (_is_metacarpal, _is_metacarpal_head): another part here needs its own.
METACARPAL_FINDINGS = frozenset({"HAND"})
# On WRIST a fracture breaks the distal radius or the ulna (by their weights, 3:1), the commonest
# wrist fractures: a broken scaphoid or metacarpal base (125 of 300 WRIST fractures before) changed a
# median of 34-72 pixels of the 64-px twin against 115-172 for the radius and ulna, and the
# supervised CNN read WRIST fractures at 0.83. Rule WF2 (docs/BENCHMARKS.md), two demo seeds: WRIST's
# 60-epoch CNN yardstick 0.917 / 0.889 -> 0.975 / 0.953, the CNN macro 0.958 / 0.950 -> 0.966 / 0.960,
# label-free 0.797 / 0.807 -> 0.794 / 0.826, stage 1 1.000. Plates, lesions and dislocations keep
# every site; the bones are found by name ("radius", "ulna").
FOREARM_BONE_FRACTURES = frozenset({"WRIST"})


def demo_finding_rules() -> dict:
    """The demo's findings beyond the issue's examples, JSON-ready: each part's size factor, the
    parts whose fractures and dislocations sit at the metacarpals and those whose fractures break the
    radius or the ulna. A demo folder's phantom stamp and
    the pre-training cache key (with ``phantoms.part_finding_sizes``) hold it, so a rule change
    redraws or retrains."""
    return {"finding_sizes": dict(FINDING_SIZE_FACTOR), "metacarpal_findings": sorted(METACARPAL_FINDINGS),
            "forearm_bone_fractures": sorted(FOREARM_BONE_FRACTURES)}


def _ref_px(n: float) -> float:
    """``n`` pixels of the reference thumbnail, in body units."""
    return n / FINDING_REFERENCE_PX


def _at_least(value: float, least: float) -> float:
    """``value`` with its magnitude raised to ``least``, sign kept (a positive least for 0)."""
    return math.copysign(max(abs(value), least), value)


_MIN_GAP = 0.011  # body units: about 1.4 px at 128 px, so a fracture line never vanishes (mild fractures under a plate)


def _site_radius(bone: Bone) -> float:
    """The scale of a finding on this bone: small bones get relatively larger findings, so
    that a finding stays a few pixels wide at 64-128 px."""
    return max(bone.radius, 0.026)


def _apply_fracture(an: Anatomy, f: Fracture, mild: bool = False, least: float = 1.0) -> None:
    """A gap plus a shifted, angulated far fragment; at least ``least`` times the MIN_FRACTURE_*
    sizes unless ``mild`` (the reduced fracture under a plate, whose metal is the finding)."""
    bone = an.bones[f.bone]
    shaft, r = bone.shaft, _site_radius(bone)
    site, u = shaft.at(f.t), shaft.direction
    n = Rigid(angle=f.tilt).point(u)          # normal of the fracture line
    c = n[0] * site[0] + n[1] * site[1]
    gap, step, turn = f.gap * r, f.shift * r, f.turn
    if mild:
        gap = max(gap, _MIN_GAP)
    else:
        gap = max(gap, _ref_px(least * MIN_FRACTURE_GAP_PX))
        step = _at_least(step, _ref_px(least * MIN_FRACTURE_STEP_PX))
        turn = _at_least(turn, math.radians(least * MIN_FRACTURE_TURN_DEG))
    half_gap = 0.5 * gap
    near = replace(bone, cuts=bone.cuts + ((-n[0], -n[1], -(c - half_gap)),))
    far = replace(bone, cuts=bone.cuts + ((n[0], n[1], c + half_gap),))
    across = (-u[1], u[0])
    move = Rigid(angle=turn, pivot=site,
                 shift=_add(_add((0.0, 0.0), across, step), u, -f.slide * r))
    an.bones[f.bone] = near
    an.bones.append(far.moved(move))
    an.move_groups(bone.distal, move)
    if f.swelling:
        r = f.swelling * bone.radius  # swelling follows the real bone, not the finding scale
        an.tissue.append(Blob(Ellipse(site, 1.4 * r, r, math.atan2(u[1], u[0])), bone.group))


def _apply_plate(an: Anatomy, pl: Plate, least: float = 1.0) -> None:
    if pl.fracture is not None:
        _apply_fracture(an, pl.fracture, mild=True)
    bone = an.bones[pl.bone]
    shaft, r = bone.shaft, bone.radius
    u = shaft.direction
    out = (-u[1] * pl.side, u[0] * pl.side)   # from the shaft towards the plate
    half = 0.5 * pl.length * shaft.length
    thick = max(pl.thick * r, _ref_px(least * MIN_PLATE_THICK_PX))
    mid = _add(shaft.at(pl.t), out, shaft.radius_at(pl.t) + 0.5 * thick)
    an.metal.append((Capsule(_add(mid, u, -half), _add(mid, u, half), 0.5 * thick), pl.mu))
    screw_r = max(pl.screw_r * r, 0.5 * _ref_px(least * MIN_SCREW_PX))
    for k in range(pl.screws):
        at = _add(mid, u, half * 0.85 * (2 * k / max(pl.screws - 1, 1) - 1))
        into = Rigid(angle=pl.screw_tilt).point((-out[0], -out[1]))
        tip = _add(at, into, 2.0 * r + thick)
        an.metal.append((Capsule(_add(at, into, -0.6 * thick), tip, screw_r, 0.7 * screw_r), pl.mu))
        an.metal.append((Ellipse(_add(at, into, -0.7 * thick), 1.3 * screw_r, 2.2 * screw_r,
                                 math.atan2(into[1], into[0])), pl.mu))


def _apply_lesion(an: Anatomy, ls: Lesion, least: float = 1.0) -> None:
    bone = an.bones[ls.bone]
    shaft, r = bone.shaft, _site_radius(bone)
    u = shaft.direction
    angle = math.atan2(u[1], u[0])
    centre = _add(shaft.at(ls.t), (-u[1], u[0]), ls.offset * bone.radius)
    across = max(ls.across * r, 0.5 * _ref_px(least * MIN_LESION_PX))   # half-axes
    along = max(ls.along * r, across)
    if across > 0.85 * bone.radius:
        # Expansile: the bone bulges around the lesion behind a thin shell of cortex.
        shell = max(0.5 * bone.cortex, 0.004)
        bulge = Ellipse(centre, along + shell, across + shell, angle)
        an.bones[ls.bone] = replace(bone, prims=bone.prims + (bulge,))
    an.holes.append(Hole(Ellipse(centre, along, across, angle), ls.depth, max(ls.rim, MIN_RIM_DENSITY),
                         _ref_px(least * MIN_RIM_PX)))
    for dt, scale in ls.satellites:
        c = _add(shaft.at(min(max(ls.t + dt, 0.0), 1.0)), (-u[1], u[0]), -0.5 * ls.offset * bone.radius)
        an.holes.append(Hole(Ellipse(c, scale * along, scale * min(across, 0.8 * bone.radius), angle),
                             ls.depth, 0.0))


def _apply_dislocation(an: Anatomy, ds: Dislocation, least: float = 1.0) -> None:
    jt = an.joints[ds.joint]
    side = (-jt.axis[1], jt.axis[0])
    shift = _add(_add((0.0, 0.0), side, ds.shift * jt.shift), jt.axis, ds.pull * jt.pull)
    reach, shortest = math.hypot(*shift), _ref_px(least * MIN_DISLOCATION_PX)
    if reach < shortest:
        shift = (shift[0] * shortest / reach, shift[1] * shortest / reach)
    an.move_groups(jt.groups, Rigid(angle=math.radians(ds.turn * jt.turn), pivot=jt.pivot,
                                    shift=shift))
    if ds.swelling:
        r = 0.35 * jt.shift * ds.swelling
        an.tissue.append(Blob(Ellipse(jt.pivot, r, 0.8 * r)))


# ============================================================================ children


def child_patient(patient: Patient, rng: np.random.Generator) -> Patient:
    """The same patient as a child: slimmer bones, a thinner cortex, less soft tissue.

    The films are scaled to the film anyway, so a child's shorter limb shows as its proportions:
    narrower shafts for their length. Draws from ``rng`` only (the child stream), so that the
    anatomy's own jitter, which comes from ``patient.seed``, stays as it was.
    """
    return replace(patient, thick=patient.thick * rng.uniform(0.72, 0.88),
                   cortex=patient.cortex * rng.uniform(0.6, 0.8), tissue=patient.tissue * rng.uniform(0.7, 0.9))


def _kept(bone: Bone, point: Point) -> bool:
    """Whether ``point`` is on the kept side of every cut of ``bone`` (a fracture fragment)."""
    return all(nx * point[0] + ny * point[1] >= c for nx, ny, c in bone.cuts)


def add_growth_plates(an: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Open growth plates, as on a child's film, on every bone that can carry a finding.

    Near each end of the shaft (half to one end radius in from the end of the shaft's axis, and
    at most a fifth of the shaft's length; the rounded tip lies one radius further out), where the
    metaphysis meets the epiphysis, a radiolucent band crosses the whole bone: the cartilage of
    the physis, which lets little of the beam through, edged by a thin sclerotic line (the zone of
    provisional calcification). Drawn as a :class:`Hole` that is no lesion, after the finding, on
    whichever fragment of a broken bone holds that end. Body units; at least a reference pixel wide,
    so that the band shows at 64 px.

    Simplifications: every such bone gets a plate at both ends (in a real hand the metacarpals
    II-V have one at the head only, the phalanges one at the base only), and the band reaches
    0.6 of a radius past each cortex, so where bones overlap it can cross the neighbour too.
    """
    for bone in list(an.bones):
        if bone.target <= 0:
            continue
        shaft = bone.shaft
        u = shaft.direction
        angle = math.atan2(u[1], u[0])
        for t_end, r_end in ((0.0, shaft.ra), (1.0, shaft.r_end)):
            inset = rng.uniform(0.5, 1.0) * r_end / max(shaft.length, 1e-9)
            centre = shaft.at(abs(t_end - min(inset, 0.2)))
            if not _kept(bone, centre):
                continue
            along = max(rng.uniform(0.12, 0.22) * bone.radius, 0.5 * _ref_px(1.0))   # half the band's width
            across = 1.6 * max(r_end, bone.radius)                                    # past both cortices
            an.holes.append(Hole(Ellipse(centre, along, across, angle), depth=float(rng.uniform(0.6, 0.85)),
                                 rim=float(rng.uniform(0.15, 0.3)), rim_width=_ref_px(0.7), lesion=False))
    return an


# ============================================================================ whole arm

# Parts that a share of the pre-training films (phantoms.whole_arm) shows as a whole-arm film.
WHOLE_ARM_PARTS: tuple[str, ...] = ("HUMERUS", "FOREARM")

# Centimetres of arm per body unit in each builder's frame (a humerus with its head about 35 cm
# over about 1 unit, an ulna about 26 cm over about 1 unit, wrist to fingertip about 19 cm over
# about 0.68 units), so that a neighbour keeps the arm's proportions.
_CM_PER_UNIT = {"HUMERUS": 35.0, "FOREARM": 26.0, "HAND": 28.0}
# Where each builder's anatomy meets its neighbours along the arm, in its own frame: the humerus's
# condyles, the forearm's distal and proximal ends, the hand's carpus (just below the lunate).
_ARM_ENDS = {("HUMERUS", "elbow"): (0.015, 0.49), ("FOREARM", "wrist"): (-0.005, -0.48),
             ("FOREARM", "elbow"): (0.0, 0.49), ("HAND", "wrist"): (-0.01, 0.36)}
# Neighbours' bones left out: the forearm film's stubs of the carpus and condyles, and the hand
# film's distal forearm, which the whole arm draws from the forearm itself.
_ARM_DROP = {"FOREARM": ("edge",), "HAND": ("radius", "ulna"), "HUMERUS": ()}
WHOLE_ARM_ZOOM = (0.45, 0.70)   # the film's magnification, times the part's usual one


@dataclass(frozen=True)
class _Placement:
    """A neighbour's frame in the film's: scale by ``k`` about the origin, mirrored top to bottom
    with ``flip_y``, then ``rigid``.

    Every builder draws the limb's lateral side at -x, but the humerus with the shoulder up and
    the forearm with the wrist up: a neighbour that hangs the other way is mirrored top to
    bottom (a half turn would put its lateral side medial).
    """

    k: float
    flip_y: bool
    rigid: Rigid

    @staticmethod
    def joining(k: float, flip_y: bool, angle: float, own_end: Point, film_end: Point) -> "_Placement":
        """Scaled by ``k`` (and mirrored), then turned by ``angle`` about its ``own_end``, which lands on ``film_end``."""
        a = (k * own_end[0], (-k if flip_y else k) * own_end[1])
        return _Placement(k, flip_y, Rigid(angle=angle, pivot=a, shift=(film_end[0] - a[0], film_end[1] - a[1])))

    def point(self, p: Point) -> Point:
        return self.rigid.point((self.k * p[0], (-self.k if self.flip_y else self.k) * p[1]))


def _add_neighbour(an: Anatomy, part: str, patient: Patient, view: View, place: _Placement) -> None:
    """``part``'s anatomy for the same patient and view, placed by ``place``, added to ``an``.

    Its bones join under groups of their own (``arm:...``), so the film's finding, already
    applied, moves none of them; their ``target`` stays, so a child's neighbours get growth plates.
    """
    other = _BUILDERS[part](patient, view)
    an.bones += [replace(b.scaled(place.k, place.flip_y).moved(place.rigid), group=f"arm:{b.group}",
                         distal=tuple(f"arm:{d}" for d in b.distal))
                 for b in other.bones if not b.name.startswith(_ARM_DROP[part])]
    an.tissue += [Blob(t.prim.scaled(place.k, place.flip_y).moved(place.rigid), f"arm:{t.group}")
                  for t in other.tissue]


def add_whole_arm(an: Anatomy, patient: Patient, view: View, rng: np.random.Generator) -> Anatomy:
    """The rest of the arm around a HUMERUS or FOREARM film's anatomy (``phantoms.whole_arm``).

    Real collections hold films of a whole arm on one long cassette (FracAtlas's upper-limb films
    include them; MURA's humerus films often reach the forearm). The part's own anatomy, with
    its finding, stays where it is (a forearm film's stubs of the carpus and the condyles give way
    to the real neighbours); its neighbours are the same patient's other builders, scaled to the
    arm's proportions (:data:`_CM_PER_UNIT`), lateral side to lateral side (:class:`_Placement`),
    and joined end to end: below a humerus the forearm, bent at the elbow by a carrying angle
    (5-15 degrees towards the lateral side, up to 30 more in lateral views), and the hand; above
    a forearm the hand and below it the humerus with the shoulder girdle.
    The film is then centred up to 0.3 body units further along the arm (a humerus film towards
    the forearm, a forearm film either way), and :func:`_render_view` zooms it out by a factor
    in :data:`WHOLE_ARM_ZOOM`. Draws from ``rng`` only (the whole-arm stream).

    Simplifications: the neighbours never carry the finding nor move with a fracture or a
    dislocation of the part, the hand is always open and flat, and the soft tissue of each piece
    keeps the part's depth. Zoomed out, the finding and a child's growth plates are smaller than
    their minimum sizes at 64 px (:data:`FINDING_REFERENCE_PX`).
    """
    if patient.part not in WHOLE_ARM_PARTS:
        raise ValueError(f"a whole-arm film is drawn for {WHOLE_ARM_PARTS}, not {patient.part!r}")
    flex = math.radians(rng.uniform(5, 15) + view.proj * rng.uniform(0, 30))
    wrist_turn = math.radians(rng.uniform(-10, 10))
    scale_of = {part: _CM_PER_UNIT[part] / _CM_PER_UNIT[patient.part] for part in _CM_PER_UNIT}
    if patient.part == "HUMERUS":
        # The forearm's and the hand's frames have the wrist up: mirrored, they hang from the elbow.
        forearm = _Placement.joining(scale_of["FOREARM"], True, flex, _ARM_ENDS["FOREARM", "elbow"],
                                     _ARM_ENDS["HUMERUS", "elbow"])
        _add_neighbour(an, "FOREARM", patient, view, forearm)
        wrist_at = forearm.point(_ARM_ENDS["FOREARM", "wrist"])
        _add_neighbour(an, "HAND", patient, view, _Placement.joining(
            scale_of["HAND"], True, flex + wrist_turn, _ARM_ENDS["HAND", "wrist"], wrist_at))
    else:
        an.bones = [b for b in an.bones if not b.name.startswith("edge")]   # the real neighbours replace the stubs
        _add_neighbour(an, "HAND", patient, view, _Placement.joining(
            scale_of["HAND"], False, wrist_turn, _ARM_ENDS["HAND", "wrist"], _ARM_ENDS["FOREARM", "wrist"]))
        # The humerus's frame has the shoulder up: mirrored, it lies below the elbow.
        _add_neighbour(an, "HUMERUS", patient, view, _Placement.joining(
            scale_of["HUMERUS"], True, flex, _ARM_ENDS["HUMERUS", "elbow"], _ARM_ENDS["FOREARM", "elbow"]))
    # Centre the film along the arm: a humerus film towards the forearm (the shoulder is in its
    # own frame already), a forearm film towards the hand or the humerus.
    along = rng.uniform(0.0, 0.3) if patient.part == "HUMERUS" else rng.uniform(-0.3, 0.3)
    return an.shifted(0.0, -float(along))


# ============================================================================ rendering


@dataclass(frozen=True)
class Pose:
    scale: float
    angle: float
    shift: Point
    mirror: float


class _Canvas:
    """The film's pixel grid mapped into the body frame, plus the map back for windows."""

    def __init__(self, height: int, width: int, pose: Pose):
        self.h, self.w, self.pose = height, width, pose
        self.long = max(height, width)
        cols = ((np.arange(width, dtype=np.float32) + 0.5 - width / 2) / self.long)[None, :]
        rows = ((np.arange(height, dtype=np.float32) + 0.5 - height / 2) / self.long)[:, None]
        self.fx, self.fy = np.broadcast_arrays(cols, rows)
        c, s = math.cos(pose.angle), math.sin(pose.angle)
        qx, qy = (cols - pose.shift[0]) / pose.scale, (rows - pose.shift[1]) / pose.scale
        self.bx = ((c * qx + s * qy) * pose.mirror).astype(np.float32)
        self.by = (-s * qx + c * qy).astype(np.float32)
        self.px = 1.0 / (self.long * pose.scale)  # one pixel, in body units

    def to_pixel(self, x: float, y: float) -> Point:
        c, s, k = math.cos(self.pose.angle), math.sin(self.pose.angle), self.pose.scale
        mx = x * self.pose.mirror
        fx = k * (c * mx - s * y) + self.pose.shift[0]
        fy = k * (s * mx + c * y) + self.pose.shift[1]
        return (fx * self.long + self.w / 2 - 0.5, fy * self.long + self.h / 2 - 0.5)

    def window(self, bounds: Sequence[float], pad: int = 3) -> tuple[slice, slice] | None:
        """The pixel rectangle covering a body-frame box, or None when it is off the film."""
        x0, x1, y0, y1 = bounds
        pts = [self.to_pixel(x, y) for x in (x0, x1) for y in (y0, y1)]
        c0 = max(int(math.floor(min(p[0] for p in pts))) - pad, 0)
        c1 = min(int(math.ceil(max(p[0] for p in pts))) + pad + 1, self.w)
        r0 = max(int(math.floor(min(p[1] for p in pts))) - pad, 0)
        r1 = min(int(math.ceil(max(p[1] for p in pts))) + pad + 1, self.h)
        if c0 >= c1 or r0 >= r1:
            return None
        return (slice(r0, r1), slice(c0, c1))


class _Layers:
    """What the beam meets, pixel by pixel, plus coverage used for the masks."""

    def __init__(self, h: int, w: int):
        self.bone, self.cover, self.cortex, self.marrow, self.metal, self.hole, self.tissue = (
            np.zeros((h, w), np.float32) for _ in range(7))
        self.tissue_gain: np.ndarray | float = 1.0  # mottled soft tissue (phantoms.texture); 1 = flat


def _draw_bone(bone: Bone, cv: _Canvas, lay: _Layers) -> None:
    win = cv.window(bone.bounds())
    if win is None:
        return
    x, y = cv.bx[win], cv.by[win]
    d = bone.prims[0].sdf(x, y)
    for prim in bone.prims[1:]:
        d = _smin(d, prim.sdf(x, y), bone.blend)
    aa = cv.px
    cortex = max(bone.cortex, 1.3 * aa)  # a cortex thinner than a pixel would vanish
    inside = np.clip(0.5 - d / aa, 0.0, 1.0)
    inner = np.clip(0.5 - (d + cortex) / aa, 0.0, 1.0)
    for nx, ny, c in bone.cuts:
        keep = np.clip(0.5 + (nx * x + ny * y - c) / aa, 0.0, 1.0)
        inside, inner = inside * keep, inner * keep
    ring = inside - inner
    lay.bone[win] += bone.density * (ring + bone.marrow * inner)
    lay.cover[win] += inside
    np.maximum(lay.cortex[win], ring, out=lay.cortex[win])
    np.maximum(lay.marrow[win], inner, out=lay.marrow[win])


def _draw_hole(hole: Hole, cv: _Canvas, lay: _Layers) -> None:
    win = cv.window(hole.shape.bounds())
    if win is None:
        return
    d = hole.shape.sdf(cv.bx[win], cv.by[win])
    soft = 1.5 * cv.px  # a slightly soft edge, as a permeative lesion has
    inside = np.clip(0.5 - d / soft, 0.0, 1.0)
    lay.bone[win] *= 1.0 - hole.depth * inside
    if hole.lesion:
        np.maximum(lay.hole[win], inside, out=lay.hole[win])
    if hole.rim:
        width = max(1.5 * cv.px, hole.rim_width)
        rim = np.clip(0.5 - (d - width) / cv.px, 0.0, 1.0) - inside
        lay.bone[win] += hole.rim * rim * np.clip(lay.cover[win], 0.0, 1.0)


def _draw_metal(prim: Prim, mu: float, cv: _Canvas, lay: _Layers) -> None:
    win = cv.window(prim.bounds())
    if win is None:
        return
    d = prim.sdf(cv.bx[win], cv.by[win])
    lay.metal[win] += mu * np.clip(0.5 - d / cv.px, 0.0, 1.0)


def _draw_tissue(an: Anatomy, cv: _Canvas, lay: _Layers) -> None:
    d = an.tissue[0].prim.sdf(cv.bx, cv.by)
    for blob in an.tissue[1:]:
        d = _smin(d, blob.prim.sdf(cv.bx, cv.by), an.tissue_blend)
    depth = np.clip(-d / an.tissue_depth, 0.0, 1.0)
    lay.tissue = np.sqrt(depth * (2.0 - depth))  # a rounded limb: thickness grows like a circle


def texture_field(height: int, width: int, wavelength: float, rng: np.random.Generator,
                  elongation: float = 1.0, axis: Point = (0.0, 1.0)) -> np.ndarray:
    """Band-pass noise: float32 (H, W), mean 0, std 1, blobs about ``wavelength`` pixels apart.

    White noise is filtered in Fourier space by a Gaussian ring around the frequency
    ``1 / wavelength`` (cycles per pixel), half as wide as its radius. ``elongation`` > 1
    stretches the blobs into streaks along ``axis`` (a pixel-space direction (dx, dy)), as
    trabeculae run along a long bone: the frequency along the axis counts ``elongation`` times.
    """
    if wavelength <= 0 or elongation < 1:
        raise ValueError(f"need wavelength > 0 and elongation >= 1, got {wavelength}, {elongation}")
    noise = rng.standard_normal((height, width))
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    norm = math.hypot(*axis) or 1.0
    ux, uy = axis[0] / norm, axis[1] / norm
    along, across = fx * ux + fy * uy, -fx * uy + fy * ux
    radius = np.sqrt((elongation * along) ** 2 + across ** 2)
    f0 = 1.0 / wavelength
    ring = np.exp(-0.5 * ((radius - f0) / (0.5 * f0)) ** 2)
    field = np.fft.irfft2(np.fft.rfft2(noise) * ring, s=(height, width))
    field -= field.mean()
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


def _add_texture(lay: _Layers, cv: _Canvas, strength: float, rng: np.random.Generator) -> None:
    """Trabecular streaks in the marrow and a mottled soft tissue (``phantoms.texture``).

    Real marrow is a lattice of trabeculae, not the flat fill the bones are drawn with, and soft
    tissue has fat planes and uneven thickness. Both are multiplicative: the marrow's
    attenuation varies by about +-15-35 % (times ``strength``) in streaks 1.5-4 % of the film's
    long side apart (never under 2.5 px), along the limb (the body frame's y axis on the film);
    the tissue's by
    +-5-15 % in blobs 6-15 % of it apart. The cortex and the masks stay as they were.
    """
    if strength <= 0:
        return
    c, s = math.cos(cv.pose.angle), math.sin(cv.pose.angle)
    # A pixel cannot show anything finer than 2.5 px: at 96 px the streaks are that coarse.
    streaks = texture_field(cv.h, cv.w, max(rng.uniform(0.015, 0.04) * cv.long, 2.5), rng,
                            elongation=rng.uniform(1.5, 3.0), axis=(-s, c))
    mottle = texture_field(cv.h, cv.w, rng.uniform(0.06, 0.15) * cv.long, rng)
    marrow_share = strength * rng.uniform(0.15, 0.35)
    lay.bone *= np.clip(1.0 + marrow_share * streaks * lay.marrow, 0.0, None)
    lay.tissue_gain = np.clip(1.0 + strength * rng.uniform(0.05, 0.15) * mottle, 0.0, None)


def _draw_anatomy(an: Anatomy, cv: _Canvas) -> _Layers:
    lay = _Layers(cv.h, cv.w)
    _draw_tissue(an, cv, lay)
    for bone in an.bones:
        _draw_bone(bone, cv, lay)
    for hole in an.holes:
        _draw_hole(hole, cv, lay)
    for prim, mu in an.metal:
        _draw_metal(prim, mu, cv, lay)
    return lay


# ---------------------------------------------------------------------------- exposure


def _film_shape(part: str, size: int, rng: np.random.Generator) -> tuple[int, int]:
    lo, hi = _ASPECT[part]
    aspect = rng.uniform(lo, hi)
    if aspect >= 1.0:
        return max(int(round(size / aspect)), 1), size
    return size, max(int(round(size * aspect)), 1)


def _sample_pose(part: str, rng: np.random.Generator, framing: float = 0.0) -> Pose:
    """The film's pose. ``framing`` (``phantoms.framing``) widens the magnification and the
    off-centre shift; it changes the ranges, not the number of draws, so the rest of the film
    stays as it was."""
    shift = 0.05 + 0.10 * framing
    return Pose(scale=_ZOOM[part] * rng.uniform(0.85 - 0.20 * framing, 1.08 + 0.22 * framing),
                angle=math.radians(rng.uniform(-1, 1) * _MAX_TURN[part]),
                shift=(rng.uniform(-shift, shift), rng.uniform(-shift, shift)),
                mirror=-1.0 if rng.random() < 0.5 else 1.0)


def _expose(lay: _Layers, patient: Patient, cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Attenuation -> brightness: overlaps add up and saturate, metal burns white."""
    gain = rng.uniform(0.95, 1.5)
    a = patient.tissue_mu * (lay.tissue * lay.tissue_gain) + lay.bone + lay.metal
    img = 1.0 - np.exp(-gain * a)
    img = np.power(img, rng.uniform(0.75, 1.3))
    img = rng.uniform(0.0, 0.08) + rng.uniform(0.85, 1.1) * img
    phi = rng.uniform(0, 2 * math.pi)  # heel effect: exposure falls off across the film
    ramp = math.cos(phi) * cv.fx + math.sin(phi) * cv.fy
    return (img * (1.0 + rng.uniform(0.0, 0.25) * ramp)).astype(np.float32)


def _collimate(img: np.ndarray, cv: _Canvas, rng: np.random.Generator, framing: float = 0.0) -> np.ndarray:
    """Shutters: a slightly rotated rectangle; outside it the film is dark or bright.
    ``framing`` lets each shutter reach further in (up to 0.13 + 0.17 * framing of the side)."""
    if rng.random() < 0.3:
        return np.ones_like(img)
    insets = np.where(rng.random(4) < 0.6, rng.uniform(0.02, 0.13 + 0.17 * framing, 4), -1.0)
    angle = math.radians(rng.uniform(-3, 3))
    c, s = math.cos(angle), math.sin(angle)
    u = c * cv.fx + s * cv.fy
    v = -s * cv.fx + c * cv.fy
    half_w, half_h = cv.w / (2 * cv.long), cv.h / (2 * cv.long)
    edge = 1.0 / cv.long
    keep = np.ones_like(img)
    for dist in (u + half_w - insets[0] * 2 * half_w, half_w - insets[1] * 2 * half_w - u,
                 v + half_h - insets[2] * 2 * half_h, half_h - insets[3] * 2 * half_h - v):
        keep *= np.clip(0.5 + dist / edge, 0.0, 1.0)
    outside = rng.uniform(0.0, 0.06) if rng.random() < 0.55 else rng.uniform(0.7, 0.95)
    img *= keep
    img += outside * (1.0 - keep)
    return keep


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (a few taps, edges repeated): the focal spot and the screen."""
    if sigma < 0.2:
        return img
    r = max(1, int(math.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(img, [(r, r) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        n = img.shape[axis]
        img = sum(float(w) * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(taps))
    return img.astype(np.float32)


@functools.lru_cache(maxsize=4096)   # bounded: annotation text lines are random strings
def _glyph(text: str) -> np.ndarray:
    """The text drawn once in PIL's built-in font (no font file needed), as a 0..1 mask."""
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    im = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(im).text((1 - left, 1 - top), text, fill=255, font=font)
    return np.asarray(im, dtype=np.float32) / 255.0


def _stamp(img: np.ndarray, text: str, rng: np.random.Generator, mask: np.ndarray) -> None:
    """Burn a bright letter marker into a random spot near an edge."""
    h, w = img.shape
    glyph = _glyph(text)
    height = max(5, int(round(rng.uniform(0.05, 0.10) * max(h, w))))
    width = max(2, int(round(glyph.shape[1] * height / glyph.shape[0])))
    if width >= w - 2 or height >= h - 2:
        return
    small = Image.fromarray((glyph * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    g = np.asarray(small, dtype=np.float32) / 255.0
    for _ in range(4):  # a second marker should not land on the first
        r0, c0 = _edge_spot(h, w, height, width, rng)
        win = (slice(r0, r0 + height), slice(c0, c0 + width))
        if mask[win].max() < 0.01:
            break
    if rng.random() < 0.3:  # some markers sit on a dark label
        img[win] = np.minimum(img[win], 0.08)
    img[win] = img[win] * (1.0 - g) + rng.uniform(0.82, 1.0) * g
    np.maximum(mask[win], g, out=mask[win])


def _edge_spot(h: int, w: int, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a box near one film edge (markers sit in the margins)."""
    along_rows = rng.random() < 0.5
    near_start = rng.random() < 0.5
    depth = int(rng.integers(1, max(2, (h if along_rows else w) // 8)))
    if along_rows:  # by the top or bottom edge, anywhere along it
        r0 = depth if near_start else h - height - depth
        c0 = int(rng.integers(1, w - width - 1))
    else:
        c0 = depth if near_start else w - width - depth
        r0 = int(rng.integers(1, h - height - 1))
    return min(max(r0, 0), h - height), min(max(c0, 0), w - width)


def _markers(img: np.ndarray, side: str, view: View, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros_like(img)
    if rng.random() < 0.9:
        _stamp(img, side, rng, mask)
    if rng.random() < 0.35:
        _stamp(img, view.label, rng, mask)
    return mask


# What extra annotations (phantoms.annotations) write: dates, accession numbers, initials, kV/mAs.
_TEXT_CHARS = "0123456789ABCDEFGHJKLMNPRSTVX/-:. "


def _glyph_at(text: str, height: int) -> np.ndarray:
    """``text`` in PIL's built-in font, scaled to ``height`` rows: a 0..1 mask (height, width)."""
    glyph = _glyph(text)
    width = max(1, int(round(glyph.shape[1] * height / glyph.shape[0])))
    small = Image.fromarray((glyph * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0


def _place(img: np.ndarray, mask: np.ndarray, shape: tuple[int, int], rng: np.random.Generator):
    """A window of ``shape`` near an edge of ``img`` that misses what ``mask`` already holds (if
    four tries find one); None when the shape does not fit."""
    h, w = img.shape
    if shape[0] >= h - 2 or shape[1] >= w - 2:
        return None
    for _ in range(4):
        r0, c0 = _edge_spot(h, w, shape[0], shape[1], rng)
        win = (slice(r0, r0 + shape[0]), slice(c0, c0 + shape[1]))
        if mask[win].max() < 0.01:
            break
    return win


def _burn(img: np.ndarray, mask: np.ndarray, win, paint: np.ndarray, value: float) -> None:
    """Blend ``value`` into ``img[win]`` where ``paint`` (0..1, the window's shape) is set."""
    img[win] = img[win] * (1.0 - paint) + value * paint
    np.maximum(mask[win], paint, out=mask[win])


def _tag(img: np.ndarray, mask: np.ndarray, side: str, long: int, rng: np.random.Generator) -> None:
    """A lead side marker as many departments use: a bright square tag with the letter left dark
    in it, or the letter inside a bright ring."""
    box = max(5, int(round(rng.uniform(0.06, 0.11) * long)))
    win = _place(img, mask, (box, box), rng)
    if win is None:
        return
    letter = np.zeros((box, box), dtype=np.float32)
    g = _glyph_at(side, max(3, int(round(box * 0.6))))[:, : box]
    r0, c0 = (box - g.shape[0]) // 2, (box - g.shape[1]) // 2
    letter[r0: r0 + g.shape[0], c0: c0 + g.shape[1]] = g
    bright = rng.uniform(0.8, 1.0)
    if rng.random() < 0.6:   # a square tag: bright, the letter cut out of it
        _burn(img, mask, win, np.ones_like(letter), bright)
        img[win] = img[win] * (1.0 - letter) + rng.uniform(0.05, 0.3) * letter
    else:                    # a ring around the letter
        yy, xx = np.mgrid[0:box, 0:box].astype(np.float32) - (box - 1) / 2.0
        radius = np.hypot(yy, xx)
        ring = np.clip(1.0 - np.abs(radius - box / 2.0 + 1.0) / max(1.0, box / 10.0), 0.0, 1.0)
        _burn(img, mask, win, np.maximum(ring, letter), bright)


def _text_lines(img: np.ndarray, mask: np.ndarray, long: int, rng: np.random.Generator) -> None:
    """One to three short lines of small text (a date, an accession number, initials) by one edge."""
    height = max(4, int(round(rng.uniform(0.03, 0.055) * long)))
    lines = [_glyph_at("".join(rng.choice(list(_TEXT_CHARS), size=int(rng.integers(3, 11)))).strip() or "0", height)
             for _ in range(int(rng.integers(1, 4)))]
    width = max(g.shape[1] for g in lines)
    block = np.zeros((len(lines) * (height + 1), width), dtype=np.float32)
    for i, g in enumerate(lines):
        block[i * (height + 1): i * (height + 1) + height, : g.shape[1]] = g
    block = block[: img.shape[0] - 3, : img.shape[1] - 3]    # a long line runs off a small film
    win = _place(img, mask, block.shape, rng)
    if win is not None:
        _burn(img, mask, win, block, rng.uniform(0.55, 1.0))


def _ruler(img: np.ndarray, mask: np.ndarray, long: int, rng: np.random.Generator) -> None:
    """A radio-opaque ruler along one edge: a bright bar with ticks every few millimetres."""
    h, w = img.shape
    along_rows = rng.random() < 0.5                         # lies along the top or bottom edge
    span = w if along_rows else h
    length = max(8, int(round(rng.uniform(0.3, 0.85) * span)))
    thick = max(2, int(round(rng.uniform(0.015, 0.035) * long)))
    tick_len = thick + max(1, int(round(rng.uniform(0.5, 1.5) * thick)))
    period = max(2, int(round(rng.uniform(0.02, 0.045) * long)))
    paint = np.zeros((tick_len, length), dtype=np.float32)
    paint[:thick] = 0.75
    paint[: (thick + tick_len + 1) // 2, ::period] = 1.0    # short ticks stand out from the bar,
    paint[:, ::period * 5] = 1.0                            # every fifth a long one
    if rng.random() < 0.5:
        paint = paint[::-1]
    if not along_rows:
        paint = paint.T
    win = _place(img, mask, paint.shape, rng)
    if win is not None:
        _burn(img, mask, win, paint, rng.uniform(0.75, 1.0))


def add_annotations(img: np.ndarray, mask: np.ndarray, side: str, rng: np.random.Generator) -> None:
    """Burn extra annotations into a film, in place: float (H, W) ``img`` and its marker ``mask``.

    What real films carry beyond the plain side letter of every phantom: a lead side marker as a
    bright square tag or ring (p 0.6), lines of small text (p 0.6: dates, accession numbers,
    initials) and a ruler along one edge (p 0.35); at least one of them. All sit near the film's
    edges and are drawn from ``rng`` alone."""
    long = max(img.shape)
    wants = rng.random(3) < (0.6, 0.6, 0.35)
    if not wants.any():
        wants[int(rng.integers(3))] = True
    if wants[0]:
        _tag(img, mask, side, long, rng)
    if wants[1]:
        _text_lines(img, mask, long, rng)
    if wants[2]:
        _ruler(img, mask, long, rng)


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = _blur(img, rng.uniform(0.2, 0.9) * max(img.shape) / 128)  # same look at any size
    return img + rng.uniform(0.006, 0.03) * rng.standard_normal(img.shape, dtype=np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _masks(lay: _Layers, keep: np.ndarray, marks: np.ndarray) -> dict[str, np.ndarray]:
    visible = (keep > 0.99) & (marks < 0.01)
    single = lay.cover < 1.2  # one bone only: overlaps are brighter and would blur the test
    plain = visible & single & (lay.metal < 0.01) & (lay.hole < 0.01)
    return {
        "bone": visible & (lay.cover > 0.5),
        "cortex": plain & (lay.cortex > 0.7),
        "marrow": plain & (lay.marrow > 0.7),
        "tissue": visible & (lay.tissue > 0.5) & (lay.cover < 0.01),
        "background": visible & (lay.tissue < 0.01) & (lay.cover < 0.01) & (lay.metal < 0.01),
        "metal": visible & (lay.metal > 0.5),
        "lesion": visible & (lay.hole > 0.5),
        "marker": marks > 0.3,
    }


def _render_view(patient: Patient, view: View, finding: Sequence[FindingSpec], side: str,
                 size: int, rng: np.random.Generator, with_masks: bool = False,
                 texture: float = 0.0, texture_rng: np.random.Generator | None = None,
                 framing: float = 0.0, child_rng: np.random.Generator | None = None,
                 arm_rng: np.random.Generator | None = None,
                 annotation_rng: np.random.Generator | None = None, least: float | None = None):
    """One film of ``patient``. With ``child_rng`` the film is a child's: growth plates drawn
    from that stream (:func:`add_growth_plates`); ``patient`` should then be :func:`child_patient`'s.
    With ``arm_rng`` it is a whole-arm film (:func:`add_whole_arm`), zoomed out by a factor drawn
    from that stream; the film's own draws from ``rng`` stay as they were. With ``annotation_rng``
    extra tags, text and a ruler are burned in from that stream (:func:`add_annotations`).
    ``least`` multiplies the findings' minimum sizes (default: the part's :data:`FINDING_SIZE_FACTOR`)."""
    if least is None:
        least = FINDING_SIZE_FACTOR[patient.part]
    anatomy = apply_finding(build_anatomy(patient, view), finding, least)
    if arm_rng is not None:
        anatomy = add_whole_arm(anatomy, patient, view, arm_rng)
    if child_rng is not None:
        anatomy = add_growth_plates(anatomy, child_rng)
    h, w = _film_shape(patient.part, size, rng)
    pose = _sample_pose(patient.part, rng, framing)
    if arm_rng is not None:
        pose = replace(pose, scale=pose.scale * float(arm_rng.uniform(*WHOLE_ARM_ZOOM)))
    cv = _Canvas(h, w, pose)
    lay = _draw_anatomy(anatomy, cv)
    if texture > 0:   # its own stream, so that the film's other draws stay as they were
        _add_texture(lay, cv, texture, texture_rng)
    img = _expose(lay, patient, cv, rng)
    keep = _collimate(img, cv, rng, framing)
    img = _finish(img, rng)
    marks = _markers(img, side, view, rng)
    if annotation_rng is not None:
        add_annotations(img, marks, side, annotation_rng)
    pixels = _to_uint8(img)
    return (pixels, _masks(lay, keep, marks)) if with_masks else pixels


_VIEW_LABELS = ("PA", "LAT", "OBL", "AP")
VIEWS: tuple[str, ...] = _VIEW_LABELS  # the projections a film is drawn in (frontal, lateral, oblique, AP)


def _sample_views(n: int, rng: np.random.Generator) -> list[View]:
    """Frontal, lateral, oblique, ... in a random order: one study, several projections."""
    bases = (0.0, 1.0, 0.5, 0.2)
    order = rng.permutation(4)
    views = []
    for k in order[:n]:
        proj = float(np.clip(bases[k] + rng.uniform(-0.12, 0.12), 0.0, 1.0))
        views.append(View(proj=proj, flex=float(rng.random()), label=_VIEW_LABELS[k]))
    return views


# ============================================================================ public API


def _check_part(part: str) -> str:
    name = str(part).strip().upper()
    name = name[3:] if name.startswith("XR_") else name
    if name not in BODY_PARTS:
        raise ValueError(f"unknown body part {part!r} (expected one of {', '.join(BODY_PARTS)})")
    return name


def _check_finding(finding: str | None) -> str | None:
    if finding is None:
        return None
    if finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r} (expected None or one of {', '.join(FINDINGS)})")
    return finding


def _check_int(value, name: str, least: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}{unit}, got {value!r}")
    return int(value)


def _check_size(size: int, least: int = 32) -> int:
    return _check_int(size, "size", least, " pixels")


def _check_level(value: float, name: str, high: float) -> float:
    """``phantoms.<name>`` as a float in [0, ``high``]; anything else (a bool, a string) is a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
        raise ValueError(f"phantoms.{name} must be a number in [0, {high:g}], got {value!r}")
    return float(value)


def check_texture(texture: float) -> float:
    """``phantoms.texture``: 0 (flat marrow and tissue, the default) to 2 (twice the default ranges)."""
    return _check_level(texture, "texture", 2.0)


def check_children(share: float) -> float:
    """``phantoms.children``: the share of films drawn as a child's, 0 (the default) to 1."""
    return _check_level(share, "children", 1.0)


def check_whole_arm(share: float) -> float:
    """``phantoms.whole_arm``: the share of HUMERUS and FOREARM films drawn as a whole arm, 0 to 1."""
    return _check_level(share, "whole_arm", 1.0)


def check_part_finding_sizes(value: bool) -> bool:
    """``phantoms.part_finding_sizes``: true or false (not a truthy string or number)."""
    if not isinstance(value, bool):
        raise ValueError(f"phantoms.part_finding_sizes must be true or false, got {value!r}")
    return value


def check_annotations(share: float) -> float:
    """``phantoms.annotations``: the share of films with extra tags, text and rulers, 0 (the default) to 1."""
    return _check_level(share, "annotations", 1.0)


def check_framing(framing: float) -> float:
    """``phantoms.framing``: 0 (today's magnification, centring and shutters, the default) to 2."""
    return _check_level(framing, "framing", 2.0)


def render_phantom(part: str, finding: str | None, rng: np.random.Generator, size: int, *,
                   return_masks: bool = False, texture: float = 0.0):
    """One film of a new random patient: uint8 (H, W) with ``max(H, W) == size``.

    ``finding`` is None (normal) or one of :data:`FINDINGS`. With ``return_masks`` the result
    is ``(image, masks)``; masks are boolean (H, W) arrays named bone, cortex, marrow (single,
    unoccluded bone only), tissue, background, metal, lesion and marker. ``texture`` is
    :func:`render_labelled`'s; its noise comes from a child of ``rng`` (``rng.spawn``), which
    leaves ``rng``'s own draws, and so the film's anatomy, pose and exposure, as they were.
    """
    part, finding, size = _check_part(part), _check_finding(finding), _check_size(size, 16)
    texture = check_texture(texture)
    texture_rng = rng.spawn(1)[0] if texture > 0 else None
    patient = sample_patient(part, rng)
    specs = sample_finding(finding, part, build_anatomy(patient, View(0.0, 0.5)), rng)
    view = _sample_views(1, rng)[0]
    side = "L" if rng.random() < 0.5 else "R"
    return _render_view(patient, view, specs, side, size, rng, with_masks=return_masks,
                        texture=texture, texture_rng=texture_rng)


def render_twins(part: str, finding: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One film of a new patient drawn twice: ``(normal twin, with the finding)``, uint8 (H, W).

    The twins share the patient, view, pose, exposure, noise and markers; only the finding
    differs, so the pair shows exactly what the finding changes (docs/phantoms.png).
    """
    part, finding, size = _check_part(part), _check_finding(finding), _check_size(size, 16)
    if finding is None:
        raise ValueError("render_twins needs a finding (one of FINDINGS)")
    patient = sample_patient(part, rng)
    specs = sample_finding(finding, part, build_anatomy(patient, View(0.0, 0.5)), rng)
    view = _sample_views(1, rng)[0]
    side = "L" if rng.random() < 0.5 else "R"
    twin_rng = np.random.default_rng()
    twin_rng.bit_generator.state = rng.bit_generator.state   # the same draws from here on
    normal = _render_view(patient, view, (), side, size, twin_rng)
    return normal, _render_view(patient, view, specs, side, size, rng)


@dataclass(frozen=True)
class LabelledFilm:
    """One phantom film with what the generator knows about it (for pre-training on phantoms)."""

    pixels: np.ndarray       # uint8 (H, W), max(H, W) == size
    part: str                # one of BODY_PARTS
    view: str                # one of VIEWS
    finding: str | None      # None (normal) or one of FINDINGS


def render_labelled(index: int, size: int, seed: int = 0, texture: float = 0.0,
                    framing: float = 0.0, children: float = 0.0, whole_arm: float = 0.0,
                    annotations: float = 0.0, part_finding_sizes: bool = False) -> LabelledFilm:
    """Film number ``index`` of an endless seeded stream of single films of new patients.

    The part is drawn uniformly, the study is abnormal with the part's share (about 0.4) and then
    carries one finding from the part's mix, and the view is one of :data:`VIEWS`. The film depends
    only on ``(seed, index, size, texture)``, so any process can draw any slice of the stream.
    ``texture`` > 0 adds trabecular and soft-tissue texture of that strength (1 = the default
    ranges, :func:`_add_texture`) from a stream of its own: the anatomy, pose and exposure stay.
    ``framing`` > 0 varies the magnification (0.65-1.30 of the usual size at 1, against 0.85-1.08),
    the centring (up to 15% of the film off centre, against 5%) and how far the shutters reach in
    (up to 30% of a side, against 13%): real films range from a whole arm on a large cassette to
    a tightly coned joint. Each film keeps its anatomy, finding, view and exposure.
    ``children`` > 0 draws that share of the films as a child's (:func:`child_patient`: slimmer
    bones, open growth plates), decided and drawn from a stream of its own: the film keeps its
    part, view, finding, pose and exposure, and the other films stay the same bytes.
    ``whole_arm`` > 0 draws that share of the HUMERUS and FOREARM films as a whole-arm film
    (:func:`add_whole_arm`: the rest of the arm added around the part, the film zoomed out),
    decided and drawn from a stream of its own in the same way; the label stays the part.
    ``annotations`` > 0 burns extra side-marker tags, text lines and rulers into that share of the
    films (:func:`add_annotations`), decided and drawn from a stream of its own in the same way.
    ``part_finding_sizes`` draws the findings as the demo's phantoms do: with the part's minimum
    sizes (:data:`FINDING_SIZE_FACTOR`) and sites (:data:`METACARPAL_FINDINGS`,
    :data:`FOREARM_BONE_FRACTURES`); by default they
    keep the issue's example sizes and every site on every part, the pre-training films that every
    real-film figure was measured with.
    """
    index, size, seed = _check_int(index, "index", 0), _check_size(size, 16), _check_seed(seed)
    texture, framing, children = check_texture(texture), check_framing(framing), check_children(children)
    whole_arm, annotations = check_whole_arm(whole_arm), check_annotations(annotations)
    part_finding_sizes = check_part_finding_sizes(part_finding_sizes)
    rng = np.random.default_rng([seed, _LABELLED_STREAM, index])
    part = BODY_PARTS[int(rng.integers(len(BODY_PARTS)))]
    finding = FINDINGS[_pick(rng, _FINDING_WEIGHTS[part])] if rng.random() < _ABNORMAL_SHARE[part] else None
    patient = sample_patient(part, rng)
    specs = sample_finding(finding, part, build_anatomy(patient, View(0.0, 0.5)), rng, part_rules=part_finding_sizes)
    view = _sample_views(1, rng)[0]
    side = "L" if rng.random() < 0.5 else "R"
    texture_rng = np.random.default_rng([seed, _TEXTURE_STREAM, index]) if texture > 0 else None
    child_rng = np.random.default_rng([seed, _CHILD_STREAM, index]) if children > 0 else None
    if child_rng is not None and child_rng.random() < children:
        patient = child_patient(patient, child_rng)   # after the finding's draws: the labels stay
    else:
        child_rng = None
    arm_rng = None
    if whole_arm > 0 and part in WHOLE_ARM_PARTS:
        arm_rng = np.random.default_rng([seed, _WHOLE_ARM_STREAM, index])
        if not arm_rng.random() < whole_arm:
            arm_rng = None
    annotation_rng = None
    if annotations > 0:
        annotation_rng = np.random.default_rng([seed, _ANNOTATION_STREAM, index])
        if not annotation_rng.random() < annotations:
            annotation_rng = None
    pixels = _render_view(patient, view, specs, side, size, rng, texture=texture, texture_rng=texture_rng,
                          framing=framing, child_rng=child_rng, arm_rng=arm_rng, annotation_rng=annotation_rng,
                          least=None if part_finding_sizes else 1.0)
    return LabelledFilm(pixels=pixels, part=part, view=view.label, finding=finding)


def reshare_film(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A film as it often comes back from the web or a teaching file: uint8 (H, W) -> uint8.

    The canvas is turned by a multiple of 90 degrees (or not), the exposure darkened by a gamma
    of 1-3 and squeezed into a narrower grey range, and the result saved as a JPEG of quality
    10-60, whose 8x8 blocks the reader's percentile scaling then stretches back into view. Many
    films of ``fracture-parts`` are such copies.
    """
    out = np.rot90(pixels, int(rng.integers(4))).astype(np.float32) / 255.0
    out = out ** float(rng.uniform(1.0, 3.0))
    low = float(rng.uniform(0.0, 0.3))
    out = low + out * float(rng.uniform(0.3, 1.0 - low))
    img = Image.fromarray(np.rint(out * 255.0).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(10, 61)))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"), dtype=np.uint8).copy()


@dataclass(frozen=True)
class StudyPlan:
    """One study of the dataset, fixed before any pixel is drawn."""

    index: int               # position in the plan: picks the study's random stream
    split: str
    part: str
    patient: int             # unique patient number
    study: int               # 1-based within the patient
    abnormal: bool
    finding: str | None
    n_views: int

    @property
    def folder(self) -> str:
        """Relative to the split folder: XR_<PART>/patient<NNNNN>/study<K>_<label>."""
        label = "positive" if self.abnormal else "negative"
        return f"XR_{self.part}/patient{self.patient:05d}/study{self.study}_{label}"


def _check_n(n: int) -> int:
    return _check_int(n, "n", len(BODY_PARTS), " (one image per body part)")


def _images_per_part(n: int, rng: np.random.Generator) -> dict[str, int]:
    base, extra = divmod(n, len(BODY_PARTS))
    lucky = set(rng.permutation(len(BODY_PARTS))[:extra].tolist())
    return {part: base + (i in lucky) for i, part in enumerate(BODY_PARTS)}


def _views_per_study(total: int, rng: np.random.Generator) -> list[int]:
    """Split ``total`` images into studies of 2-4 views (one view only if total is 1)."""
    counts = []
    left = total
    while left > 0:
        k = int(rng.choice((2, 3, 4), p=(0.4, 0.35, 0.25)))
        if left - k == 1:  # never strand a single image
            k = k + 1 if k < 4 else k - 1
        k = min(k, left)
        counts.append(k)
        left -= k
    return counts


def _abnormal_flags(part: str, n_studies: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly the part's share, so every part with two studies has both labels."""
    k = int(round(_ABNORMAL_SHARE[part] * n_studies))
    if n_studies >= 2:
        k = min(max(k, 1), n_studies - 1)
    flags = np.zeros(n_studies, dtype=bool)
    flags[rng.permutation(n_studies)[:k]] = True
    return flags


def _split_key(split: str) -> int:
    """A stable number for the split name: train and valid get different random streams."""
    return int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:4], "little")


def _check_seed(seed: int) -> int:
    return _check_int(seed, "seed", 0)


def plan_studies(n: int, seed: int = 0, first_patient: int = 1, split: str = "train") -> list[StudyPlan]:
    """The dataset's studies without drawing anything: parts, patients, labels, findings, views.

    Images are shared out evenly over the seven parts; some patients have a second study.
    Patient numbers are unique and shuffled across parts, starting at ``first_patient``.
    """
    n, seed = _check_n(n), _check_seed(seed)
    first_patient = _check_int(first_patient, "first_patient", 1)
    rng = np.random.default_rng([seed, _PLAN_STREAM, _split_key(split)])
    drafts = []  # (part, patient slot, study number, abnormal, finding, views)
    slot = 0
    for part, count in _images_per_part(n, rng).items():
        views = _views_per_study(count, rng)
        flags = _abnormal_flags(part, len(views), rng)
        study = 0
        for i, k in enumerate(views):
            if study == 0 or study >= 2 or rng.random() > 0.15:  # 15% come back for a 2nd study
                slot, study = slot + 1, 0
            study += 1
            finding = FINDINGS[_pick(rng, _FINDING_WEIGHTS[part])] if flags[i] else None
            drafts.append((part, slot, study, bool(flags[i]), finding, k))
    numbers = rng.permutation(slot) + first_patient
    return [StudyPlan(index=i, split=split, part=part, patient=int(numbers[s - 1]), study=st,
                      abnormal=ab, finding=fd, n_views=k)
            for i, (part, s, st, ab, fd, k) in enumerate(drafts)]


def render_study(plan: StudyPlan, size: int, seed: int) -> list[np.ndarray]:
    """All views of one study; depends only on (seed, plan), never on the process drawing it."""
    seed, key = _check_seed(seed), _split_key(plan.split)
    patient = sample_patient(plan.part, np.random.default_rng([seed, _PATIENT_STREAM, key, plan.patient]))
    rng = np.random.default_rng([seed, _STUDY_STREAM, key, plan.index])
    specs = sample_finding(plan.finding, plan.part, build_anatomy(patient, View(0.0, 0.5)), rng)
    side = "L" if rng.random() < 0.5 else "R"
    return [_render_view(patient, view, specs, side, size, rng)
            for view in _sample_views(plan.n_views, rng)]


@dataclass
class PhantomSummary:
    out: Path
    n_images: int
    n_studies: int
    n_abnormal_studies: int
    seconds: float
    per_part: dict[str, int]  # images per part


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Fixed settings and no metadata chunks: the same pixels always give the same bytes.
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``name.tmp`` then rename: a killed run never leaves half a file under the name."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_study(job: tuple[StudyPlan, str, int, int]) -> int:
    plan, root, size, seed = job
    folder = Path(root) / plan.folder
    folder.mkdir(parents=True, exist_ok=True)
    for k, pixels in enumerate(render_study(plan, size, seed), start=1):
        _write_atomic(folder / f"image{k}.png", _png_bytes(pixels))
    return plan.n_views


_OWNER_MARK = ".bonecluster-phantoms"


def _prepare_split(split_dir: Path) -> None:
    """Clear an earlier phantom run; refuse to write into a folder that is not ours."""
    if split_dir.exists() and any(split_dir.iterdir()):
        if not (split_dir / _OWNER_MARK).exists():
            raise FileExistsError(f"{split_dir} exists and was not written by `bonecluster phantom`; "
                                  "choose an empty or new output folder")
        for part in BODY_PARTS:
            shutil.rmtree(split_dir / f"XR_{part}", ignore_errors=True)
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / _OWNER_MARK).write_text("synthetic radiographs; safe to delete\n")


def _run_jobs(jobs: list, workers: int, progress: bool, total: int) -> None:
    bar = _progress_bar(total, progress)
    try:
        if workers <= 1:
            for job in jobs:
                bar.update(_write_study(job))
            return
        _run_pool(jobs, workers, bar)
    finally:
        bar.close()


def _run_pool(jobs: list, workers: int, bar) -> None:
    # spawn: safe even when the caller has torch (and its threads) loaded.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    chunk = max(1, min(16, len(jobs) // (workers * 4)))
    try:
        for done in pool.map(_write_study, jobs, chunksize=chunk):
            bar.update(done)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: do not render the queued rest
        raise
    pool.shutdown()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool, desc: str = "phantoms", unit: str = "img"):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit=unit, desc=desc)


def _write_mura_csvs(out: Path, split: str, plans: list[StudyPlan]) -> None:
    """MURA-v1.1's two index files; their paths start with the dataset folder's name."""
    from bonecluster.io import atomic_write_text

    root = out.resolve().name
    images, studies, findings = io.StringIO(), io.StringIO(), io.StringIO()
    w_img, w_std, w_fnd = csv.writer(images, lineterminator="\n"), csv.writer(studies, lineterminator="\n"), \
        csv.writer(findings, lineterminator="\n")
    w_fnd.writerow(["study", "body_part", "abnormal", "finding", "views"])
    for p in plans:
        folder = f"{root}/{split}/{p.folder}/"
        w_std.writerow([folder, int(p.abnormal)])
        w_fnd.writerow([folder, p.part, int(p.abnormal), p.finding or "", p.n_views])
        for k in range(1, p.n_views + 1):
            w_img.writerow([f"{folder}image{k}.png"])
    atomic_write_text(out / f"{split}_image_paths.csv", images.getvalue())
    atomic_write_text(out / f"{split}_labeled_studies.csv", studies.getvalue())
    atomic_write_text(out / f"{split}_phantom_findings.csv", findings.getvalue())


def _default_workers(n_images: int) -> int:
    """One process per usable core, but none for small sets: starting them costs more."""
    if n_images < 256:
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def generate_phantoms(out: str | Path, n: int = 1400, size: int = 128, seed: int = 0,
                      split: str = "train", workers: int | None = None,
                      progress: bool = True, first_patient: int | None = None) -> PhantomSummary:
    """Write ``n`` synthetic films in MURA layout under ``out/<split>/`` and return a summary.

    Also writes MURA's ``<split>_image_paths.csv`` / ``<split>_labeled_studies.csv`` and
    ``<split>_phantom_findings.csv`` (finding per study) in ``out``. Rerunning into a folder an
    earlier run wrote replaces that split; a folder with other content raises FileExistsError.
    Patients are numbered from ``first_patient``: by default 1 for train and 90001 for any
    other split, whose images also come from other random streams than train's.
    """
    start = time.perf_counter()
    n, size, seed = _check_n(n), _check_size(size), _check_seed(seed)
    if not split or any(c in split for c in "/\\") or split in (".", ".."):
        raise ValueError(f"split must be a plain folder name such as 'train', got {split!r}")
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise ValueError(f"workers must be >= 1 or None, got {workers!r}")
    out = Path(out)
    if first_patient is None:
        first_patient = 1 if split == "train" else _OTHER_SPLIT_FIRST_PATIENT
    plans = plan_studies(n, seed, first_patient=first_patient, split=split)
    split_dir = out / split
    _prepare_split(split_dir)
    jobs = [(p, str(split_dir), size, int(seed)) for p in plans]
    n_workers = min(_default_workers(n) if workers is None else int(workers), len(jobs))
    _run_jobs(jobs, n_workers, progress, n)
    _write_mura_csvs(out, split, plans)
    per_part = {part: sum(p.n_views for p in plans if p.part == part) for part in BODY_PARTS}
    return PhantomSummary(out=out, n_images=n, n_studies=len(plans),
                          n_abnormal_studies=sum(p.abnormal for p in plans),
                          seconds=time.perf_counter() - start, per_part=per_part)


# ============================================================================ contact sheet


def make_twin_sheet(out_png: str | Path, size: int = 64, zoom: int = 2, seed: int = 0,
                    findings: Sequence[str] = FINDINGS) -> Path:
    """A grid: one row per body part, and for each finding its normal twin then the finding
    (:func:`render_twins`), drawn at ``size`` px (the demo's 64-px thumbnails) and enlarged
    ``zoom`` times pixel by pixel, so that the sheet shows what the network sees."""
    size, zoom = _check_size(size, 16), _check_int(zoom, "zoom", 1)
    kinds = [_check_finding(f) for f in findings]
    label_h, pad, gap = 12, 4, 10
    cell = size * zoom
    pair_w = 2 * (cell + pad) + gap
    sheet = Image.new("L", (pair_w * len(kinds) + pad, (cell + label_h + pad) * len(BODY_PARTS) + pad), 40)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, part in enumerate(BODY_PARTS):
        for col, finding in enumerate(kinds):
            rng = np.random.default_rng([int(seed), _SHEET_STREAM, row, col, 1])
            for k, film in enumerate(render_twins(part, finding, rng, size)):
                x0, y0 = pad + col * pair_w + k * (cell + pad), pad + row * (cell + label_h + pad)
                big = Image.fromarray(film).resize((film.shape[1] * zoom, film.shape[0] * zoom), Image.NEAREST)
                sheet.paste(big, (x0 + (cell - big.width) // 2, y0 + label_h + (cell - big.height) // 2))
                text = f"{part.lower()} normal twin" if k == 0 else finding
                draw.text((x0 + 1, y0), text, fill=170 if k == 0 else 235, font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG", optimize=True)
    return out_png


def make_contact_sheet(out_png: str | Path, size: int = 128, seed: int = 0, n_normal: int = 2,
                       findings: Sequence[str] = FINDINGS) -> Path:
    """A grid: one row per body part, ``n_normal`` normal films then one per finding."""
    size = _check_size(size)
    columns: list[str | None] = [None] * n_normal + [_check_finding(f) for f in findings]
    label_h, pad = 12, 4
    cell_w, cell_h = size + pad, size + label_h + pad
    sheet = Image.new("L", (cell_w * len(columns) + pad, cell_h * len(BODY_PARTS) + pad), 40)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, part in enumerate(BODY_PARTS):
        for col, finding in enumerate(columns):
            rng = np.random.default_rng([int(seed), _SHEET_STREAM, row, col])
            film = render_phantom(part, finding, rng, size)
            x0, y0 = pad + col * cell_w, pad + row * cell_h
            left = x0 + (size - film.shape[1]) // 2
            top = y0 + label_h + (size - film.shape[0]) // 2
            sheet.paste(Image.fromarray(film), (left, top))
            draw.text((x0 + 1, y0), f"{part.lower()} {finding or 'normal'}", fill=235, font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG", optimize=True)
    return out_png

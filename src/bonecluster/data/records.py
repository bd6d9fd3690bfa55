"""One record per image: the unit that flows from readers to the cache and the engine."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bonecluster import BODY_PARTS

log = logging.getLogger("bonecluster")


@dataclass(frozen=True)
class Record:
    """An image and what is known about it.

    ``body_part`` is one of :data:`bonecluster.BODY_PARTS` or None; ``abnormal`` is None when
    unknown. Labels are carried for scoring and for grouping stage 2 by metadata; the
    unsupervised stages never train on them.
    """

    path: str
    patient: str | None = None
    study: str | None = None
    body_part: str | None = None
    abnormal: bool | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


def study_key(record: Record) -> str:
    """The record's study id; a record without one is its own study."""
    return record.study or f"image:{record.path}"


def study_index(records) -> "np.ndarray":
    """(N,) int64 study number of each record (:func:`study_key`), numbered in order of first
    appearance. Only equality of ids is used, never a label."""
    import numpy as np

    ids: dict[str, int] = {}
    return np.array([ids.setdefault(study_key(r), len(ids)) for r in records], np.int64)


def normalise_body_part(value: str | None) -> str | None:
    """Map 'XR_WRIST', 'wrist' or ' Wrist ' to 'WRIST'; '' and None to None.

    Raises ValueError for a name that is not one of the seven MURA parts.
    """
    if value is None:
        return None
    name = value.strip().upper()
    if name.startswith("XR_"):
        name = name[3:]
    if not name:
        return None
    if name not in BODY_PARTS:
        raise ValueError(f"unknown body part {value!r} (expected one of {', '.join(BODY_PARTS)})")
    return name


class SkipError(Exception):
    """A file that cannot be used. The message is the reason, shown next to the file name."""


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class SkipLog:
    """Collects skipped files: one warning line each, counted, written into the run folder."""

    items: list[Skipped] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        item = Skipped(str(path), reason)
        self.items.append(item)
        log.warning("skipped %s: %s", item.path, item.reason)

    def extend(self, other: "SkipLog") -> None:
        self.items.extend(other.items)

    def __len__(self) -> int:
        return len(self.items)

    def to_list(self) -> list[dict]:
        return [asdict(s) for s in self.items]

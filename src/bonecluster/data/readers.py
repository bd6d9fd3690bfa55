"""Readers turn what a user points at into :class:`Record` lists, chosen automatically.

Three kinds of source are understood (see :func:`read_records`):

(a) a MURA root. With MURA-v1.1's CSVs (``*_image_paths.csv`` and ``*_labeled_studies.csv``,
    no header) the CSVs are used; otherwise the tree
    ``XR_<PART>/patientN/studyK_{positive,negative}/imageN.*`` is walked.
(b) a CSV manifest with a header and at least ``path,body_part,abnormal`` (``patient``,
    ``study`` and ``split`` are optional). Relative paths resolve against the CSV's folder;
    empty cells mean unknown.
(c) any other folder (or a single file): searched recursively for images and DICOM files,
    with no labels. DICOM headers supply patient and study ids where present.

Rows and files that cannot be used are skipped into a :class:`SkipLog`, never fatal.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bonecluster import BODY_PARTS as _MURA_PARTS
from bonecluster.data.decode import IMAGE_SUFFIXES, is_dicom
from bonecluster.data.dicomweb import DicomWebError, fetch as fetch_instances, is_dicomweb, parse_source
from bonecluster.data.records import Record, SkipLog, normalise_body_part


class DataError(Exception):
    """A whole source is unusable (missing, empty, not understood). Fatal for the command."""


@dataclass(frozen=True)
class ReaderLimits:
    """Input limits for CSV files (manifests and MURA-v1.1's CSVs).

    ``max_csv_row_chars``: a row (one line, not counting its line ending) longer than this is
    skipped with a warning naming ``file:line``; a header that long makes the manifest a
    DataError. Lines are read at most this long, so a file without line breaks cannot fill
    memory. CLI ``--max-csv-row-chars``, config ``data.max_csv_row_chars``.
    """

    max_csv_row_chars: int = 65_536

    def __post_init__(self) -> None:
        value = self.max_csv_row_chars
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"max_csv_row_chars must be a positive int, got {value!r}")


# MURA: .../XR_WRIST/patient00001/study1_positive/image1.png
_MURA_IMAGE = re.compile(
    r"XR_(?P<part>[A-Z]+)/(?P<patient>patient\w+)/(?P<study>study\d+)_(?P<label>positive|negative)/[^/]+$"
)
_TRUE = {"1", "true", "yes", "positive", "abnormal", "y", "t"}
_FALSE = {"0", "false", "no", "negative", "normal", "n", "f"}


def parse_abnormal(value: str | None) -> bool | None:
    """'1'/'true'/'positive' -> True, '0'/'false'/'negative' -> False, '' -> None."""
    if value is None or not value.strip():
        return None
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"abnormal must be 0/1, true/false or empty, got {value!r}")


def record_from_mura_path(path: Path, split: str | None = None) -> Record | None:
    """Parse MURA's folder names; None when the path is not in MURA layout."""
    m = _MURA_IMAGE.search(path.as_posix())
    if not m or m["part"] not in _MURA_PARTS:
        return None
    if split is None:
        split = _split_above(path)
    patient = m["patient"]
    return Record(
        path=str(path),
        patient=patient,
        study=f"{m['part']}/{patient}/{m['study']}",
        body_part=m["part"],
        abnormal=m["label"] == "positive",
        split=split,
    )


def _split_above(path: Path) -> str | None:
    """MURA puts train/ or valid/ above XR_<PART>."""
    parts = path.parts
    for i, p in enumerate(parts):
        if p.startswith("XR_") and i > 0:
            return parts[i - 1] if parts[i - 1] in ("train", "valid", "test") else None
    return None


# ----------------------------------------------------------------------------- dispatch


def detect_kind(source: str | Path) -> str:
    """Return 'mura-csv', 'mura', 'manifest' or 'folder' for a path (raises DataError)."""
    src = Path(source)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.is_file():
        return "manifest" if src.suffix.lower() == ".csv" else "folder"
    if list(src.glob("*_image_paths.csv")):
        return "mura-csv"
    if _find_xr_folders(src):
        return "mura"
    return "folder"


def _find_xr_folders(root: Path, depth: int = 2) -> list[Path]:
    """XR_<PART> folders at most `depth` levels below root (MURA-v1.1/train/XR_WRIST)."""
    found: list[Path] = []
    level = [root]
    for _ in range(depth + 1):
        nxt: list[Path] = []
        for d in level:
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir())
            except OSError:
                continue
            found += [c for c in children if c.name.startswith("XR_")]
            nxt += [c for c in children if not c.name.startswith("XR_")]
        if found:
            return found
        level = nxt
    return found


def read_records(source: str | Path, skips: SkipLog | None = None,
                 limits: ReaderLimits = ReaderLimits(), fetch=None) -> list[Record]:
    """Read one source into records, choosing the reader from what the path holds.

    A ``dicomweb+http(s)://`` source is fetched into ``fetch`` (a
    :class:`bonecluster.data.dicomweb.FetchOptions`) first, then read like a PACS export."""
    skips = skips if skips is not None else SkipLog()
    if is_dicomweb(source):
        return read_dicomweb(str(source), skips, fetch)
    kind = detect_kind(source)
    if kind == "mura-csv":
        return read_mura_csv(source, skips, limits)
    if kind == "mura":
        return read_mura_tree(source, skips)
    if kind == "manifest":
        return read_manifest(source, skips, limits)
    return read_folder(source, skips)


def read_sources(sources: list[str | Path], skips: SkipLog | None = None,
                 limits: ReaderLimits = ReaderLimits(), skip_bad_sources: bool = False,
                 fetch=None) -> list[Record]:
    """Read several sources; an image named twice (same resolved path) is kept once.

    ``skip_bad_sources``: a source that cannot be read at all (missing, unreadable CSV, a DICOMweb
    server that cannot be searched...) is recorded in ``skips`` and the others go on, instead of
    raising DataError. ``fetch``: where DICOMweb sources are fetched to (:func:`read_records`).
    """
    if not sources:
        raise DataError("no data source given")
    seen: set[str] = set()
    out: list[Record] = []
    for src in sources:
        try:
            found = read_records(src, skips, limits, fetch)
        except DataError as err:
            if not skip_bad_sources or skips is None:
                raise
            name = str(src) if is_dicomweb(src) else str(Path(src))
            skips.add(name, str(err).removeprefix(f"{name}: "))
            continue
        for rec in found:
            key = os.path.realpath(rec.path)
            if key not in seen:
                seen.add(key)
                out.append(rec)
    return out


# ----------------------------------------------------------------------------- MURA


def read_mura_tree(root: str | Path, skips: SkipLog) -> list[Record]:
    """Walk XR_<PART>/patientN/studyK_{positive,negative}/imageN.* below root."""
    records = []
    for xr in _find_xr_folders(Path(root)):
        for path in sorted(xr.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            rec = record_from_mura_path(path) if _looks_like_image(path) else None
            if rec is None:
                if _looks_like_image(path):
                    skips.add(path, "not in MURA layout XR_<PART>/patientN/studyK_<label>/")
                continue
            records.append(rec)
    return records


def read_mura_csv(root: str | Path, skips: SkipLog,
                  limits: ReaderLimits = ReaderLimits()) -> list[Record]:
    """Use MURA-v1.1's ``*_image_paths.csv`` and ``*_labeled_studies.csv`` (no headers).

    Paths in them start with ``MURA-v1.1/``, so they resolve against root's parent; when that
    fails they are tried relative to root itself (a renamed root folder).
    """
    root = Path(root)
    study_labels = _read_mura_study_labels(root, skips, limits)
    records = []
    for csv_path in sorted(root.glob("*_image_paths.csv")):
        split = csv_path.name.split("_image_paths")[0]
        for lineno, row in _csv_rows(csv_path, skips, limits):
            if not row or not row[0].strip():
                continue
            rel = row[0].strip()
            path = _resolve_mura_path(root, rel)
            if path is None:
                skips.add(root.parent / rel, f"listed in {csv_path.name}:{lineno} but missing")
                continue
            rec = record_from_mura_path(Path(rel), split=split)
            if rec is None:
                skips.add(path, f"{csv_path.name}:{lineno}: path is not in MURA layout")
                continue
            study_key = rel.rsplit("/", 1)[0] + "/"
            label = study_labels.get(study_key, rec.abnormal)
            records.append(Record(str(path), rec.patient, rec.study, rec.body_part, label, split))
    return records


def _read_mura_study_labels(root: Path, skips: SkipLog, limits: ReaderLimits) -> dict[str, bool]:
    labels: dict[str, bool] = {}
    for csv_path in sorted(root.glob("*_labeled_studies.csv")):
        for lineno, row in _csv_rows(csv_path, skips, limits):
            try:
                study, label = row[0].strip(), parse_abnormal(row[1])
            except (IndexError, ValueError) as err:
                skips.add(f"{csv_path}:{lineno}", f"malformed row: {err}")
                continue
            labels[study if study.endswith("/") else study + "/"] = bool(label)
    return labels


def _resolve_mura_path(root: Path, rel: str) -> Path | None:
    for candidate in (root.parent / rel, root / rel.split("/", 1)[-1]):
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------- manifest

REQUIRED_COLUMNS = ("path", "body_part", "abnormal")
OPTIONAL_COLUMNS = ("patient", "study", "split")


def read_manifest(csv_path: str | Path, skips: SkipLog,
                  limits: ReaderLimits = ReaderLimits()) -> list[Record]:
    """A CSV with a header ``path,body_part,abnormal[,patient,study,split]``.

    Malformed rows and files listed but missing are skipped (named ``file:line``).
    """
    csv_path = Path(csv_path)
    rows = _csv_rows(csv_path, skips, limits, header=True)
    header = [h.strip().lower() for h in next(rows, (0, []))[1]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{csv_path}: manifest header lacks column(s) {', '.join(missing)} "
                        f"(expected {','.join(REQUIRED_COLUMNS)})")
    records = []
    for lineno, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{csv_path}:{lineno}"
        if len(row) != len(header):
            skips.add(where, f"malformed row: {len(row)} fields, header has {len(header)}")
            continue
        try:
            rec = _manifest_record(csv_path.parent, dict(zip(header, row)))
        except ValueError as err:
            skips.add(where, f"malformed row: {err}")
            continue
        if not Path(rec.path).is_file():
            skips.add(rec.path, f"listed in {csv_path.name}:{lineno} but missing")
            continue
        records.append(rec)
    return records


def _manifest_record(base: Path, cells: dict[str, str]) -> Record:
    raw_path = cells["path"].strip()
    if not raw_path:
        raise ValueError("empty path")
    path = Path(raw_path)
    path = path if path.is_absolute() else base / path
    optional = {c: (cells.get(c) or "").strip() or None for c in OPTIONAL_COLUMNS}
    return Record(
        path=str(path),
        body_part=normalise_body_part(cells["body_part"]),
        abnormal=parse_abnormal(cells["abnormal"]),
        **optional,
    )


def _csv_rows(csv_path: Path, skips: SkipLog, limits: ReaderLimits = ReaderLimits(),
              header: bool = False):
    """Yield (line number, cells), one line per row (\\n, \\r\\n or \\r endings).

    A row longer than ``limits.max_csv_row_chars`` characters (its line ending not counted) and
    a row the csv module cannot parse are skipped into ``skips`` as ``file:line``; with
    ``header``, such a first line raises DataError instead (there is no manifest without it).
    Text that is not UTF-8 raises DataError. No more than the limit (plus a line ending) is
    ever held in memory for one line.
    """
    limit = limits.max_csv_row_chars
    try:
        handle = open(csv_path, newline="", encoding="utf-8-sig", errors="strict")
    except OSError as err:
        raise DataError(f"{csv_path}: cannot open ({err.strerror})") from err
    with handle:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = handle.readline(limit + 2)  # room for the row and a "\r\n"
                if not line:
                    return
                too_long = len(line.rstrip("\r\n")) > limit
                if too_long:
                    _discard_rest_of_line(handle, line)
            except UnicodeDecodeError as err:
                raise DataError(f"{csv_path}: not UTF-8 text near line {lineno} ({err.reason})") from err
            if too_long:
                why = f"longer than {limit} characters (limit max_csv_row_chars)"
                if header and lineno == 1:
                    raise DataError(f"{csv_path}:1: header line {why}")
                skips.add(f"{csv_path}:{lineno}", f"malformed row: {why}")
                continue
            try:
                cells = next(csv.reader([line]))
            except (csv.Error, StopIteration) as err:
                if header and lineno == 1:
                    raise DataError(f"{csv_path}:1: unreadable header line ({err})") from err
                skips.add(f"{csv_path}:{lineno}", f"malformed row: {err}")
                continue
            yield lineno, cells


def _discard_rest_of_line(handle, line: str, chunk: int = 65_536) -> None:
    """After reading the start ``line`` of an over-long line, read past its end.

    readline(size) may stop between the "\\r" and "\\n" of a "\\r\\n"; that "\\n" belongs to
    this line, not to an empty line after it (which would shift every later line number).
    """
    while line and not line.endswith(("\n", "\r")):
        line = handle.readline(chunk)
    if line.endswith("\r"):
        at = handle.tell()
        if handle.read(1) != "\n":
            handle.seek(at)


# ----------------------------------------------------------------------------- DICOMweb


def read_dicomweb(source: str, skips: SkipLog, fetch) -> list[Record]:
    """Fetch a DICOMweb source's instances into ``fetch.mirror`` (:mod:`bonecluster.data.dicomweb`)
    and read them as a PACS export: patient, study and body part from the DICOM headers."""
    try:
        src = parse_source(source)
        if fetch is None:
            raise DicomWebError(f"{src}: a DICOMweb source needs a cache folder to fetch into")
        paths, _ = fetch_instances(src, fetch, skips)
    except DicomWebError as err:
        raise DataError(str(err)) from err
    return [_folder_record(Path(fetch.mirror), path) for path in paths]


# ----------------------------------------------------------------------------- plain folder


def read_folder(source: str | Path, skips: SkipLog) -> list[Record]:
    """Images and DICOMs below a folder (or one file), sorted, without labels.

    The study is the image's parent folder relative to the root (a PACS export's series
    folder), so study-level scores still make sense; DICOM headers override it.
    """
    root = Path(source)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    records = []
    for path in files:
        if path.name.startswith("."):
            continue
        if not _looks_like_image(path):
            continue
        records.append(_folder_record(root, path))
    return records


def _looks_like_image(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    # PACS exports often have no extension at all: trust the DICOM preamble.
    return suffix == "" and is_dicom(path)


def _folder_record(root: Path, path: Path) -> Record:
    rel_parent = path.parent.relative_to(root).as_posix() if root.is_dir() else ""
    study = rel_parent if rel_parent not in ("", ".") else None
    patient = None
    body_part = None
    if is_dicom(path):
        patient, dicom_study, body_part = _dicom_ids(path)
        study = dicom_study or study
    return Record(path=str(path), patient=patient, study=study, body_part=body_part)


def _dicom_ids(path: Path) -> tuple[str | None, str | None, str | None]:
    """PatientID, StudyInstanceUID and a MURA body part from BodyPartExamined, if readable."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["PatientID", "StudyInstanceUID", "BodyPartExamined"])
    except Exception:  # noqa: BLE001 - a bad header is reported when the pixels are decoded
        return None, None, None
    part = str(getattr(ds, "BodyPartExamined", "") or "")
    try:
        body_part = normalise_body_part(part)
    except ValueError:
        body_part = None
    return (str(getattr(ds, "PatientID", "") or "") or None,
            str(getattr(ds, "StudyInstanceUID", "") or "") or None, body_part)

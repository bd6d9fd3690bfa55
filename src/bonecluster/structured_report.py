"""A study's predictions as a DICOM Structured Report, to store back in the PACS it came from.

:func:`study_report` builds one Comprehensive SR (DICOM PS3.3 A.35.3) per study: the source
study's patient and study modules (same StudyInstanceUID, so the PACS files it with the films),
a new series (Modality SR, "research use" in its description), and a content tree with, per body
part found in the study, the part, the number of films scored, the abnormality score, the
threshold and whether it is flagged, plus the model's run id and the software version. Its
evidence sequence lists every source instance it was computed from.

Concept names use a private coding scheme (``99BCL``; PS3.16 8.2: designators starting with "99"
are local, identified in the CodingSchemeIdentificationSequence), since no standard code names an
unsupervised model's score. The series UID is derived from the run id and the study UID, and the
instance UID from those and the report's content (its films and results), so storing the same
report twice sends the same instance (a PACS keeps one), and a changed result is a new instance
in the same series.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SCHEME = "99BCL"
NOTICE = "Research use only: produced by an unsupervised model (bonecluster); not for diagnosis."
SERIES_NUMBER = 9701
# Source attributes copied into the report (Patient and General Study modules; type 2: present, maybe empty).
_PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_CHARSET = "SpecificCharacterSet"   # type 1C: how the copied names are encoded
_STUDY = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass(frozen=True)
class PartResult:
    """What the model said about one body part of a study (score None: no stage-2 model for it)."""

    part: str
    n_images: int
    score: float | None
    threshold: float | None
    abnormal: bool | None


def _code(value: str, meaning: str, scheme: str = SCHEME) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(value_type: str, code: str, meaning: str, value) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = DicomSequence([_code(code, meaning)])
    if value_type == "TEXT":
        item.TextValue = str(value)
    elif value_type == "NUM":
        measured = Dataset()
        measured.NumericValue = f"{float(value):.6g}"
        measured.MeasurementUnitsCodeSequence = DicomSequence([_code("1", "no units", "UCUM")])
        item.MeasuredValueSequence = DicomSequence([measured])
    elif value_type == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
        item.ContentSequence = DicomSequence(value)
    return item


def _part_items(result: PartResult) -> list[Dataset]:
    items = [_item("TEXT", "PART", "Body part (model)", result.part),
             _item("NUM", "NIMG", "Images scored", result.n_images)]
    if result.score is None:
        items.append(_item("TEXT", "NOS2", "Abnormality", "not scored: no stage-2 model for this body part"))
    else:
        items += [_item("NUM", "ABN", "Abnormality score", result.score),
                  _item("NUM", "THR", "Abnormality threshold", result.threshold),
                  _item("TEXT", "FLAG", "Flagged abnormal", "yes" if result.abnormal else "no")]
    return items


def _evidence(sources: Sequence[Dataset]) -> DicomSequence:
    """CurrentRequestedProcedureEvidenceSequence: the study's source instances, by series."""
    series: dict[str, list[Dataset]] = {}
    for src in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
        series.setdefault(str(src.SeriesInstanceUID), []).append(ref)
    study = Dataset()
    study.StudyInstanceUID = sources[0].StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence()
    for uid, refs in series.items():
        item = Dataset()
        item.SeriesInstanceUID = uid
        item.ReferencedSOPSequence = DicomSequence(refs)
        study.ReferencedSeriesSequence.append(item)
    return DicomSequence([study])


def study_report(sources: Sequence[Dataset], results: Sequence[PartResult], run_id: str, version: str,
                 now: datetime.datetime | None = None) -> Dataset:
    """The Comprehensive SR of one study. ``sources``: the headers of the study's films that were
    scored (at least one; all of one StudyInstanceUID); ``results``: one per body part."""
    if not sources:
        raise ValueError("a study report needs at least one source instance")
    study_uids = {str(s.StudyInstanceUID) for s in sources}
    if len(study_uids) != 1:
        raise ValueError(f"the source instances belong to {len(study_uids)} studies, not one")
    study_uid = study_uids.pop()
    now = now or datetime.datetime.now()
    first = sources[0]
    ds = Dataset()
    ds.preamble = b"\0" * 128   # so that any writer (STOW-RS clients too) makes a Part 10 file
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = COMPREHENSIVE_SR
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = COMPREHENSIVE_SR
    content_key = [f"{s.SeriesInstanceUID}/{s.SOPInstanceUID}" for s in sources] + [repr(r) for r in results]
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["bonecluster-sr-instance", run_id, study_uid, *content_key])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if _CHARSET in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    for keyword in _PATIENT + _STUDY:
        setattr(ds, keyword, getattr(first, keyword, "") or "")
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["bonecluster-sr-series", run_id, study_uid])
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = "bonecluster research output (not for clinical use)"
    ds.Manufacturer = "bonecluster"
    ds.ManufacturerModelName = "bonecluster"
    ds.SoftwareVersions = version
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"      # no person has signed it
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.PerformedProcedureCodeSequence = DicomSequence()
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(sources)
    scheme = Dataset()
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = SCHEME, "bonecluster local codes"
    ds.CodingSchemeIdentificationSequence = DicomSequence([scheme])
    # the document's root container (PS3.3 C.17.3)
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("RESULT", "bonecluster research result")])
    ds.ContinuityOfContent = "SEPARATE"
    content = [_item("TEXT", "NOTICE", "Notice", NOTICE)]
    for result in results:
        content.append(_item("CONTAINER", "PARTRES", f"Result for {result.part}", _part_items(result)))
    content += [_item("TEXT", "RUN", "Model run id", run_id),
                _item("TEXT", "VER", "Software version", version)]
    ds.ContentSequence = DicomSequence(content)
    return ds


def read_report(ds: Dataset) -> dict:
    """The report's content as plain values, for tests and for a person reading one back:
    ``{"notice", "run_id", "version", "parts": {PART: {"n_images", "score", "threshold", "flagged"}}}``."""
    out: dict = {"parts": {}}
    top = {"NOTICE": "notice", "RUN": "run_id", "VER": "version"}
    for item in ds.ContentSequence:
        code = item.ConceptNameCodeSequence[0].CodeValue
        if code in top:
            out[top[code]] = str(item.TextValue)
        elif code == "PARTRES":
            values = {}
            for sub in item.ContentSequence:
                key = sub.ConceptNameCodeSequence[0].CodeValue
                values[key] = (float(sub.MeasuredValueSequence[0].NumericValue) if sub.ValueType == "NUM"
                               else str(sub.TextValue))
            out["parts"][values["PART"]] = {"n_images": int(values["NIMG"]), "score": values.get("ABN"),
                                            "threshold": values.get("THR"), "flagged": values.get("FLAG")}
    return out


def headers(path: str | Path) -> Dataset:
    """A source film's header (no pixels), for :func:`study_report`."""
    from pydicom import dcmread

    return dcmread(path, stop_before_pixels=True)

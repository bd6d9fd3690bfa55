"""The study's Structured Report (bonecluster.structured_report): what it copies, refers to and says."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.uid import generate_uid

from bonecluster.structured_report import (COMPREHENSIVE_SR, NOTICE, PartResult, read_report,
                                           study_report)
from tests.unit.dicom_utils import dicom_dataset

STUDY = generate_uid()


def _film(series: str, **attrs):
    return dicom_dataset(np.zeros((4, 4), np.uint16), PatientID="P7", PatientName="Doe^Jane", StudyInstanceUID=STUDY,
                         SeriesInstanceUID=series, AccessionNumber="A123", StudyDate="20250102", **attrs)


def test_the_report_files_under_the_source_study_refers_to_every_film_and_reads_back():
    series_a, series_b = generate_uid(), generate_uid()
    films = [_film(series_a), _film(series_a), _film(series_b)]
    results = [PartResult("HAND", 2, 0.8125, 0.5, True), PartResult("WRIST", 1, None, None, None)]
    sr = study_report(films, results, "run@abc", "bonecluster 9.9", now=datetime.datetime(2026, 1, 2, 3, 4, 5))
    buf = io.BytesIO()
    dcmwrite(buf, sr, enforce_file_format=True)
    back = dcmread(io.BytesIO(buf.getvalue()))
    assert back.SOPClassUID == COMPREHENSIVE_SR and back.Modality == "SR"
    assert (back.StudyInstanceUID, back.PatientID, back.PatientName, back.AccessionNumber) == (STUDY, "P7", "Doe^Jane", "A123")
    assert back.SeriesInstanceUID not in (series_a, series_b) and back.ContentDate == "20260102"
    assert "not for clinical use" in back.SeriesDescription and back.VerificationFlag == "UNVERIFIED"
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == STUDY
    referred = {s.SeriesInstanceUID: {r.ReferencedSOPInstanceUID for r in s.ReferencedSOPSequence}
                for s in evidence.ReferencedSeriesSequence}
    assert referred == {series_a: {films[0].SOPInstanceUID, films[1].SOPInstanceUID},
                        series_b: {films[2].SOPInstanceUID}}
    assert read_report(back) == {"notice": NOTICE, "run_id": "run@abc", "version": "bonecluster 9.9", "parts": {
        "HAND": {"n_images": 2, "score": 0.8125, "threshold": 0.5, "flagged": "yes"},
        "WRIST": {"n_images": 1, "score": None, "threshold": None, "flagged": None}}}


def test_the_same_run_and_study_give_the_same_uids_and_another_run_new_ones():
    films = [_film(generate_uid())]
    one = study_report(films, [PartResult("HAND", 1, 0.1, 0.5, False)], "run@1", "v")
    again = study_report(films, [PartResult("HAND", 1, 0.1, 0.5, False)], "run@1", "v")
    other = study_report(films, [PartResult("HAND", 1, 0.1, 0.5, False)], "run@2", "v")
    assert (one.SeriesInstanceUID, one.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert one.SOPInstanceUID != other.SOPInstanceUID and one.SeriesInstanceUID != other.SeriesInstanceUID


def test_films_of_two_studies_or_none_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        study_report([], [], "r", "v")
    other = dicom_dataset(np.zeros((4, 4), np.uint16), StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    with pytest.raises(ValueError, match="2 studies"):
        study_report([_film(generate_uid()), other], [], "r", "v")


# The Comprehensive SR IOD's type 1 and type 2 attributes (PS3.3 A.35.3: Patient, General Study,
# SR Document Series, General Equipment, SR Document General and SR Document Content modules).
TYPE_1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality", "SeriesInstanceUID", "InstanceNumber",
          "ContentDate", "ContentTime", "CompletionFlag", "VerificationFlag", "ValueType",
          "ConceptNameCodeSequence", "ContinuityOfContent")
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "Manufacturer",
          "ReferencedPerformedProcedureStepSequence", "PerformedProcedureCodeSequence")


def test_every_required_attribute_is_there_and_the_names_keep_their_character_set():
    film = _film(generate_uid(), SpecificCharacterSet="ISO_IR 192")
    film.PatientName = "Müller^Zoë"
    sr = study_report([film], [PartResult("HAND", 1, 0.3, 0.5, False)], "r", "v")
    assert all(sr.get(k) not in (None, "") for k in TYPE_1)
    assert all(k in sr for k in TYPE_2)
    assert sr.ConceptNameCodeSequence[0].CodingSchemeDesignator == sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator
    buf = io.BytesIO()
    dcmwrite(buf, sr, enforce_file_format=True)
    back = dcmread(io.BytesIO(buf.getvalue()))
    assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == "Müller^Zoë"


def test_a_changed_result_is_a_new_instance_in_the_same_series():
    films = [_film(generate_uid())]
    before = study_report(films, [PartResult("HAND", 1, 0.1, 0.5, False)], "run@1", "v")
    after = study_report(films, [PartResult("HAND", 1, 0.9, 0.5, True)], "run@1", "v")
    assert before.SeriesInstanceUID == after.SeriesInstanceUID and before.SOPInstanceUID != after.SOPInstanceUID

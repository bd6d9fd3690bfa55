"""The DICOMweb source's address, filters and credentials (bonecluster.data.dicomweb); the round
trip against a real Orthanc is in tests/integration/test_dicomweb.py."""

from __future__ import annotations

import pytest

from bonecluster.data.dicomweb import (DicomWebError, DicomWebSource, is_dicomweb, parse_source,
                                       session_from_env)


def test_a_dicomweb_source_is_told_from_a_path():
    assert is_dicomweb("dicomweb+http://pacs:8042/dicom-web")
    assert is_dicomweb("DICOMweb+https://pacs/dicom-web")
    for path in ("data/films", "/tmp/dicomweb+http", "http://pacs:8042/dicom-web", "dicomweb+ftp://pacs/x"):
        assert not is_dicomweb(path)


def test_the_address_and_filters_are_parsed_and_shown_without_a_trailing_slash():
    src = parse_source("dicomweb+http://10.0.0.5:8042/dicom-web/?ModalitiesInStudy=CR,DX&StudyDate=20250101-20251231")
    assert src == DicomWebSource("http://10.0.0.5:8042/dicom-web",
                                 (("ModalitiesInStudy", "CR,DX"), ("StudyDate", "20250101-20251231")))
    assert str(src) == "dicomweb+http://10.0.0.5:8042/dicom-web?ModalitiesInStudy=CR,DX&StudyDate=20250101-20251231"
    assert parse_source("dicomweb+https://pacs.example.org/wado").filters == ()


@pytest.mark.parametrize("bad, says", [
    ("dicomweb+http://user:secret@pacs:8042/dicom-web", "credentials do not go in the address"),
    ("dicomweb+http://:8042/dicom-web", "no valid host"),
    ("dicomweb+http://pacs:99999/dicom-web", "no valid host"),
    ("dicomweb+http://pacs/dicom-web?StudyDate", "Attribute=value"),
    ("dicomweb+http://pacs/dicom-web#studies", "fragment"),
    ("pacs:8042", "not a DICOMweb source"),
])
def test_a_bad_address_is_a_clear_error_that_never_repeats_a_password(bad, says):
    with pytest.raises(DicomWebError, match=says) as err:
        parse_source(bad)
    assert "secret" not in str(err.value)


def test_credentials_come_from_the_environment():
    assert session_from_env({"BONECLUSTER_DICOMWEB_TOKEN": "t0k"}).headers["Authorization"] == "Bearer t0k"
    basic = session_from_env({"BONECLUSTER_DICOMWEB_USER": "ann", "BONECLUSTER_DICOMWEB_PASSWORD": "pw"})
    assert basic.auth == ("ann", "pw") and "Authorization" not in basic.headers
    plain = session_from_env({})
    assert plain.auth is None and "Authorization" not in plain.headers
    with pytest.raises(DicomWebError, match="needs both"):
        session_from_env({"BONECLUSTER_DICOMWEB_USER": "ann"})

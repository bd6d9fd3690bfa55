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


# ----------------------------------------------------------------------------- fetch, with a fake client


class FakeClient:
    """Stands in for dicomweb_client.DICOMwebClient: ``studies`` / ``instances`` are the search
    answers, ``faults[sop]`` a list of exceptions raised by that instance's first tries."""

    def __init__(self, studies, instances, faults=None, page_cap=None, ignores_offset=False):
        self.studies, self.instances, self.faults = studies, instances, faults or {}
        self.page_cap, self.ignores_offset, self.calls = page_cap, ignores_offset, []

    def set_http_retry_params(self, retry=True):
        pass

    def _page(self, items, limit, offset):
        offset = 0 if self.ignores_offset else offset
        limit = min(limit, self.page_cap or limit)
        return items[offset: offset + limit]

    def search_for_studies(self, search_filters=None, limit=None, offset=0):
        return self._page(self.studies, limit, offset)

    def search_for_instances(self, study_instance_uid, fields=(), limit=None, offset=0):
        found = self.instances.get(study_instance_uid)
        if isinstance(found, Exception):
            raise found
        return self._page(found, limit, offset)

    def retrieve_instance(self, study, series, sop):
        self.calls.append(sop)
        queue = self.faults.get(sop, [])
        if queue:
            raise queue.pop(0)
        return _dataset(study, series, sop)


def _dataset(study, series, sop):
    import numpy as np

    from tests.unit.dicom_utils import dicom_dataset

    ds = dicom_dataset(np.zeros((4, 4), np.uint16), StudyInstanceUID=study, SeriesInstanceUID=series)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    return ds


def _tag(uid):
    return {"Value": [uid], "vr": "UI"}


def _study(uid):
    return {"0020000D": _tag(uid)}


def _inst(series, sop, rows=4, sop_class="1.2.840.10008.5.1.4.1.1.1.1"):
    return {"0020000E": _tag(series), "00080018": _tag(sop), "00080016": _tag(sop_class),
            "00280010": {"Value": [rows]}, "00280011": {"Value": [4]}}


def _fetch(client, tmp_path, **kw):
    from bonecluster.data import SkipLog
    from bonecluster.data.dicomweb import FetchOptions, fetch

    skips = SkipLog()
    options = FetchOptions(tmp_path, workers=1, backoff=0.0, progress=False, **kw)
    paths, stats = fetch("dicomweb+http://pacs:1/dw", options, skips, client_factory=lambda **_: client)
    return paths, stats, skips


def _http_error(status):
    import requests

    response = requests.Response()
    response.status_code, response.reason = status, "x"
    return requests.HTTPError(response=response)


def test_retries_are_for_passing_faults_only(tmp_path):
    import requests

    studies = [_study("1.1")]
    instances = {"1.1": [_inst("1.1.1", f"1.1.1.{i}") for i in range(1, 6)]}
    faults = {"1.1.1.1": [_http_error(503)],                        # passes: fetched on try 2
              "1.1.1.2": [_http_error(404)],                        # final at once
              "1.1.1.3": [requests.ConnectionError("x")] * 3,       # every try: unreachable
              "1.1.1.4": [requests.exceptions.SSLError("cert")]}    # never retried
    client = FakeClient(studies, instances, faults)
    paths, stats, skips = _fetch(client, tmp_path)
    assert sorted(p.stem for p in paths) == ["1.1.1.1", "1.1.1.5"]
    reasons = {s.path.rsplit("/", 1)[1]: s.reason for s in skips.items}
    assert reasons["1.1.1.2"].startswith("HTTP 404") and "TLS error" in reasons["1.1.1.4"]
    assert "cannot connect" in reasons["1.1.1.3"] and "(3 tries)" in reasons["1.1.1.3"]
    assert client.calls.count("1.1.1.1") == 2 and client.calls.count("1.1.1.2") == 1
    assert client.calls.count("1.1.1.3") == 3 and client.calls.count("1.1.1.4") == 1


def test_paging_goes_on_under_a_capped_page_and_stops_where_the_offset_is_ignored(tmp_path):
    studies = [_study(f"2.{i}") for i in range(1, 8)]
    instances = {f"2.{i}": [_inst(f"2.{i}.1", f"2.{i}.1.1")] for i in range(1, 8)}
    paths, stats, _ = _fetch(FakeClient(studies, instances, page_cap=3), tmp_path / "a", page=5)
    assert stats.studies == 7 and len(paths) == 7
    paths, stats, _ = _fetch(FakeClient(studies, instances, ignores_offset=True), tmp_path / "b", page=5)
    assert stats.studies == 5                 # no endless loop; what the server sent once


def test_bad_search_answers_and_a_study_that_cannot_be_searched_skip_only_themselves(tmp_path):
    studies = [_study("3.1"), _study("3.2"), _study("3.3\n"), {"0020000D": "not an object"}, "junk", _study("3.4")]
    instances = {"3.1": [_inst("3.1.1", "3.1.1.1"), _inst("3.1.1", "../../etc/passwd"), {"00280010": 5},
                         _inst("3.1.1", "3.1.1.2", rows="many"), _inst("3.1.2", "3.1.2.1", sop_class="1.2.840.10008.5.1.4.1.1.88.33")],
                 "3.2": _http_error(404), "3.4": [_inst("3.4.1", "3.4.1.1", rows=10_000)]}
    paths, stats, skips = _fetch(FakeClient(studies, instances), tmp_path, pixel_cap=1_000)
    assert sorted(p.stem for p in paths) == ["3.1.1.1", "3.1.1.2"]      # a Rows that is no number: not checked here
    assert stats.not_images == 1                                          # the SR stays on the server
    reasons = " | ".join(f"{s.path} {s.reason}" for s in skips.items)
    assert "without a valid StudyInstanceUID" in reasons and "'3.3\\n'" in reasons
    assert "3.2 cannot search the study's instances: HTTP 404" in reasons
    assert reasons.count("without valid UIDs") == 2 and "over the pixel cap" in reasons
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in tmp_path.rglob("*"))


def test_an_instance_cut_before_its_end_is_not_kept(tmp_path):
    short = _dataset("4.1", "4.1.1", "4.1.1.1")
    short.PixelData = short.PixelData[:10]
    bare = _dataset("4.1", "4.1.1", "4.1.1.2")
    del bare.PixelData

    class Cutting(FakeClient):
        def retrieve_instance(self, study, series, sop):
            self.calls.append(sop)
            return {"4.1.1.1": short, "4.1.1.2": bare}.get(sop) or _dataset(study, series, sop)

    client = Cutting([_study("4.1")], {"4.1": [_inst("4.1.1", f"4.1.1.{i}") for i in (1, 2, 3)]})
    paths, _, skips = _fetch(client, tmp_path)
    assert [p.stem for p in paths] == ["4.1.1.3"] and len(list(tmp_path.rglob("*.dcm"))) == 1
    assert "10 of 32 bytes" in skips.items[0].reason and "without pixel data" in skips.items[1].reason
    assert client.calls.count("4.1.1.1") == 3                           # retried: a cut may pass

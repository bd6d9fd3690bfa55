"""DICOMweb in (issue 26): a real Orthanc on loopback, searched with QIDO-RS and read with WADO-RS
into the cache, and the faults of a bad or vanishing server, injected by a proxy before it."""

from __future__ import annotations

import threading

import pytest

from bonecluster.config import load_config
from bonecluster.data import DataError, SkipLog, prepare_sources, read_sources
from bonecluster.data.dicomweb import FetchOptions, fetch
from tests.integration.orthanc import FaultProxy, phantom_dicoms, start_orthanc

N_STUDIES, VIEWS = 12, 2
N_INSTANCES = N_STUDIES * VIEWS
FAST = dict(backoff=0.01, timeout=2.0)   # keep the retries of the fault tests short


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        for dicom in phantom_dicoms(N_STUDIES, views=VIEWS):
            server.upload(dicom)
        yield server
    finally:
        server.stop()


def _source(url: str, query: str = "") -> str:
    return f"dicomweb+{url}{query}"


def test_prepare_reads_the_pacs_like_a_folder_once_and_then_from_the_mirror(orthanc, tmp_path):
    cfg = load_config("cpu", overrides=["data.size=32"])
    data = prepare_sources([_source(orthanc.dicomweb)], cfg.data, cache=tmp_path, progress=False)
    assert len(data) == N_INSTANCES and not data.skipped
    records = data.records
    assert {r.body_part for r in records} == {"HAND", "ELBOW", "HUMERUS"}       # BodyPartExamined
    assert len({r.study for r in records}) == N_STUDIES                         # StudyInstanceUID
    assert all(r.patient and r.patient.startswith("patient") for r in records)  # PatientID
    assert data.images().shape == (N_INSTANCES, 32, 32)
    mirrored = sorted((tmp_path / "dicomweb").rglob("*.dcm"))
    assert len(mirrored) == N_INSTANCES
    stamps = {p: p.stat().st_mtime_ns for p in mirrored}
    # again: nothing is fetched twice, and the records are the same
    paths, stats = fetch(_source(orthanc.dicomweb), FetchOptions(tmp_path / "dicomweb", progress=False), SkipLog())
    assert (stats.downloaded, stats.reused, stats.instances) == (0, N_INSTANCES, N_INSTANCES)
    assert {p: p.stat().st_mtime_ns for p in paths} == stamps


def test_qido_filters_choose_the_studies(orthanc, tmp_path):
    skips = SkipLog()
    options = FetchOptions(tmp_path, progress=False)
    paths, stats = fetch(_source(orthanc.dicomweb, "?PatientID=patient001"), options, skips)
    assert stats.studies == 2 and len(paths) == 2 * VIEWS and not skips.items
    paths, stats = fetch(_source(orthanc.dicomweb, "?StudyDate=19990101"), options, skips)
    assert stats.studies == 0 and paths == []
    _, stats = fetch(_source(orthanc.dicomweb, "?ModalitiesInStudy=CR,DX&StudyDate=20250101-20251231"), options, skips)
    assert stats.studies == N_STUDIES                                  # the example filter
    _, stats = fetch(_source(orthanc.dicomweb, "?ModalitiesInStudy=CR"), options, skips)
    assert stats.studies == 0


def test_the_search_pages_through_every_study(orthanc, tmp_path):
    paths, stats = fetch(_source(orthanc.dicomweb), FetchOptions(tmp_path, page=5, progress=False), SkipLog())
    assert stats.studies == N_STUDIES and len(paths) == N_INSTANCES


def test_an_instance_over_the_pixel_cap_is_skipped_before_download(orthanc, tmp_path):
    skips = SkipLog()
    paths, stats = fetch(_source(orthanc.dicomweb), FetchOptions(tmp_path, pixel_cap=100, progress=False), skips)
    assert paths == [] and stats.skipped == N_INSTANCES and stats.downloaded == 0
    assert all("over the pixel cap of 100" in s.reason for s in skips.items)
    assert all(s.path.startswith(_source(orthanc.dicomweb) + "#") for s in skips.items)


def test_a_server_that_cannot_be_searched_is_a_clear_error(tmp_path):
    from tests.integration.orthanc import free_port

    cfg = load_config("cpu", overrides=["data.size=32"])
    url = _source(f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(DataError, match="cannot search studies: cannot connect"):
        prepare_sources([url], cfg.data, cache=tmp_path, progress=False)
    skips = SkipLog()   # where bad sources are skipped (predict), it is reported and the rest goes on
    assert read_sources([url], skips, skip_bad_sources=True, fetch=FetchOptions(tmp_path, **FAST)) == []
    assert skips.items[0].path == url and "cannot connect" in skips.items[0].reason


def _instance_fault(which: set[int], what, tries: int = 99):
    """A fault for the WADO-RS retrievals numbered in ``which`` (1-based, in the order they come),
    on their first ``tries`` tries."""
    number: dict[str, int] = {}
    tried: dict[str, int] = {}

    def fault(method, path, n):
        if "/instances/" not in path:   # WADO-RS .../series/S/instances/I, not the QIDO-RS searches
            return None
        number.setdefault(path, len(number) + 1)
        tried[path] = tried.get(path, 0) + 1
        return what if number[path] in which and tried[path] <= tries else None

    return fault


@pytest.mark.parametrize("what, reason", [(503, "HTTP 503"), (500, "HTTP 500"), ("truncate", "cut short"),
                                          ("drop", "cannot connect"), ("hang", "timed out")])
def test_a_passing_fault_is_retried_and_a_lasting_one_skips_only_its_instance(orthanc, tmp_path, what, reason):
    # instances 2 and 3 meet the fault on their first try only (retried, fetched); instance 5 on every try
    proxy = FaultProxy(orthanc.port, lambda m, p, n: (first(m, p, n) or always(m, p, n)))
    first, always = _instance_fault({2, 3}, what, tries=1), _instance_fault({5}, what)
    try:
        skips = SkipLog()
        options = FetchOptions(tmp_path, workers=1, attempts=3, progress=False, **FAST)
        paths, stats = fetch(_source(proxy.dicomweb), options, skips)
    finally:
        proxy.close()
    assert len(paths) == N_INSTANCES - 1 and stats.skipped == 1, skips.items
    assert reason in skips.items[0].reason
    assert len(list(tmp_path.rglob("*.dcm"))) == N_INSTANCES - 1
    assert not list(tmp_path.rglob("*.tmp"))                       # nothing half-written


def _fetch_through(orthanc, fault, tmp_path):
    """One fetch of the whole server through a FaultProxy with ``fault``, one instance at a time."""
    proxy = FaultProxy(orthanc.port, fault)
    try:
        skips = SkipLog()
        paths, stats = fetch(_source(proxy.dicomweb), FetchOptions(tmp_path, workers=1, progress=False, **FAST), skips)
    finally:
        proxy.close()
    return paths, stats, skips


def test_a_payload_that_is_not_dicom_is_skipped_and_not_retried(orthanc, tmp_path):
    tries = []
    garbage = _instance_fault({4}, "garbage")
    paths, stats, skips = _fetch_through(orthanc, lambda m, p, n: tries.append(p) or garbage(m, p, n), tmp_path)
    assert len(paths) == N_INSTANCES - 1 and stats.skipped == 1
    assert "not a DICOM payload" in skips.items[0].reason or "InvalidDicom" in skips.items[0].reason
    assert len(tries) == len(set(tries))                             # one try each


def test_a_server_gone_mid_run_skips_the_rest_keeps_what_came_and_the_next_run_fetches_only_the_rest(
        tmp_path):
    server = start_orthanc(tmp_path / "pacs")
    try:
        for dicom in phantom_dicoms(6, views=2, seed=1):
            server.upload(dicom)
        after = 4   # the server stops when the proxy has passed 4 instances on
        passed, stopping = [0], []

        def vanish(method, path, n):
            if "/instances/" in path and not stopping:
                passed[0] += 1
                if passed[0] == after + 1:   # the real server goes; from now on nothing answers
                    stopping.append(threading.Thread(target=server.stop))
                    stopping[0].start()
            return "drop" if stopping else None

        proxy = FaultProxy(server.port, vanish)
        skips = SkipLog()
        options = FetchOptions(tmp_path / "mirror", workers=1, give_up_after=3, progress=False, **FAST)
        try:
            paths, stats = fetch(_source(proxy.dicomweb), options, skips)
        finally:
            proxy.close()
        assert len(paths) == after and stats.skipped == 12 - after
        assert sum("not tried" in s.reason for s in skips.items) == 12 - after - 3   # gone after 3 in a row
        kept = sorted(p.name for p in (tmp_path / "mirror").rglob("*.dcm"))
        assert len(kept) == after
        stopping[0].join()
        assert server.process.poll() is not None            # the real server is gone
        server = start_orthanc(tmp_path / "pacs")          # back, with the same storage
        paths, stats = fetch(_source(server.dicomweb), options, SkipLog())
        assert (stats.downloaded, stats.reused, len(paths)) == (12 - after, after, 12)
    finally:
        server.stop()


def test_credentials_come_from_the_environment_and_never_from_the_address(orthanc, tmp_path, monkeypatch, caplog):
    seen = []
    proxy = FaultProxy(orthanc.port, lambda m, p, n: None)
    original = proxy._handle

    def spy(h):
        seen.append(h.headers.get("Authorization"))
        original(h)

    proxy._handle = spy
    monkeypatch.setenv("BONECLUSTER_DICOMWEB_TOKEN", "s3cret-token")
    try:
        fetch(_source(proxy.dicomweb, "?PatientID=patient000"), FetchOptions(tmp_path, progress=False), SkipLog())
    finally:
        proxy.close()
    assert seen and all(a == "Bearer s3cret-token" for a in seen)
    # and never in what is printed or kept, even where a request fails
    broken = FaultProxy(orthanc.port, _instance_fault({1}, 500))
    skips = SkipLog()
    try:
        with caplog.at_level("DEBUG"):
            fetch(_source(broken.dicomweb, "?PatientID=patient000"),
                  FetchOptions(tmp_path / "again", workers=1, progress=False, **FAST), skips)
    finally:
        broken.close()
    assert len(skips.items) == 1 and "s3cret" not in repr(skips.items) and "s3cret" not in caplog.text
    monkeypatch.setenv("BONECLUSTER_DICOMWEB_TOKEN", "s3cret-token\r")
    with pytest.raises(DataError, match="control character") as err:
        read_sources([_source(orthanc.dicomweb)], SkipLog(), fetch=FetchOptions(tmp_path))
    assert "s3cret" not in str(err.value)
    with pytest.raises(DataError, match="credentials do not go in the address"):
        read_sources([_source(f"http://user:pw@127.0.0.1:{orthanc.port}/dicom-web")], SkipLog(),
                     fetch=FetchOptions(tmp_path))


def test_cli_prepare_takes_a_dicomweb_source(orthanc, tmp_path, capsys):
    from bonecluster.cli import main

    out = tmp_path / "prepared"
    assert main(["prepare", _source(orthanc.dicomweb, "?PatientID=patient002"), "--out", str(out),
                 "--set", "data.size=32"]) == 0
    assert len(list((out / "dicomweb").rglob("*.dcm"))) == 2 * VIEWS
    assert "4 images" in capsys.readouterr().out


def test_predict_reads_a_dicomweb_source_and_reports_each_study(orthanc, tiny_serve_run, tmp_path):
    from bonecluster.predict import predict_paths

    run, _ = tiny_serve_run
    report = predict_paths(run, [_source(orthanc.dicomweb, "?PatientID=patient000")], progress=False,
                           cache=tmp_path)
    assert len(report.images) == 2 * VIEWS and not report.skipped
    assert {p.part for p in report.images} <= {"HAND", "ELBOW", "HUMERUS"}
    assert len({p.study for p in report.images}) == 2 and len(report.studies) == 2
    gone = predict_paths(run, [_source(orthanc.dicomweb), "no/such/folder"], progress=False)   # temp cache
    assert len(gone.images) == N_INSTANCES and [s.reason for s in gone.skipped] == ["no such file or folder"]


def test_the_throughput_benchmark_runs_and_prints_its_figures(tmp_path, capsys):
    from tests.conftest import load_benchmark
    from tests.integration.orthanc import orthanc_or_skip

    orthanc_or_skip()
    out = tmp_path / "figures.json"
    assert load_benchmark("bench_dicomweb").main(["--studies", "2", "--size", "48", "--json", str(out)]) == 0
    import json

    figures = json.loads(out.read_text())
    assert figures["instances"] == 4 and figures["dicomweb_prepare_per_s"] > 0 and figures["folder_prepare_per_s"] > 0


def test_predict_store_puts_one_structured_report_per_study_back_in_the_pacs(orthanc, tiny_serve_run, tmp_path,
                                                                             capsys):
    import json

    from pydicom import dcmread

    from bonecluster import __version__
    from bonecluster.cli import main
    from bonecluster.predict import run_identity
    from bonecluster.structured_report import COMPREHENSIVE_SR, NOTICE, read_report
    from dicomweb_client import DICOMwebClient

    run, _ = tiny_serve_run
    source = _source(orthanc.dicomweb, "?PatientID=patient003")
    out = tmp_path / "p.json"
    assert main(["predict", str(run), source, "--store", "--out", str(out), "--quiet",
                 "--cache", str(tmp_path / "cache")]) == 0
    report = json.loads(out.read_text())
    assert report["summary"]["reports_stored"] == 2 and report["summary"]["reports_not_stored"] == 0
    assert "stored 2 report(s) in the PACS" in capsys.readouterr().err
    client = DICOMwebClient(orthanc.dicomweb)
    assert sorted(s["study"] for s in report["stored"]) == sorted({s["study"] for s in report["studies"]})
    for stored in report["stored"]:
        assert stored["stored"] and stored["source"] == source
        series = client.search_for_series(study_instance_uid=stored["study"])
        modalities = sorted(s["00080060"]["Value"][0] for s in series)
        assert modalities == ["DX", "SR"]                                    # the films' series and a new one
        sr = client.retrieve_instance(stored["study"], stored["series_uid"], stored["sop_instance_uid"])
        assert sr.Modality == "SR" and sr.StudyInstanceUID == stored["study"]
        films = [p for p in report["images"] if p["study"] == stored["study"]]
        refs = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                for r in s.ReferencedSOPSequence}
        assert refs == {str(dcmread(p["path"], stop_before_pixels=True).SOPInstanceUID) for p in films}
        content = read_report(sr)
        assert content["notice"] == NOTICE and content["version"] == f"bonecluster {__version__}"
        assert content["run_id"] == run_identity(run)
        study_rows = [s for s in report["studies"] if s["study"] == stored["study"]]
        for row in study_rows:
            part = content["parts"][row["part"]]
            assert part["n_images"] == row["n_images"] and part["flagged"] == ("yes" if row["abnormal"] else "no")
            assert part["score"] == pytest.approx(row["score"], rel=1e-5)
            assert part["threshold"] == pytest.approx(row["threshold"], rel=1e-5)
        assert sr.PatientID == "patient003"
    # the same run stores the same instances again: the PACS keeps one report per study; the
    # reports now in the studies are not fetched as films
    from bonecluster.predict import predict_paths

    again = predict_paths(run, [source], store=True, progress=False)
    assert len(again.images) == len(report["images"]) and not again.skipped and all(s.stored for s in again.stored)
    assert [s.sop_instance_uid for s in again.stored] == [s["sop_instance_uid"] for s in report["stored"]]
    for stored in report["stored"]:
        reports = [i for i in client.search_for_instances(study_instance_uid=stored["study"])
                   if i["00080016"]["Value"][0] == COMPREHENSIVE_SR]
        assert len(reports) == 1


def test_store_needs_a_dicomweb_input_and_reports_what_the_server_refuses(orthanc, tiny_serve_run, tmp_path):
    from bonecluster.predict import predict_paths

    run, phantoms = tiny_serve_run
    with pytest.raises(DataError, match="no input is one"):
        predict_paths(run, [phantoms], store=True, progress=False)
    refuse = FaultProxy(orthanc.port, lambda m, p, n: 403 if m == "POST" else None)
    try:
        report = predict_paths(run, [_source(refuse.dicomweb, "?PatientID=patient004")], store=True,
                               progress=False, cache=tmp_path)
    finally:
        refuse.close()
    assert len(report.stored) == 2 and not any(s.stored for s in report.stored)
    assert all("HTTP 403" in s.reason for s in report.stored) and len(report.images) == 2 * VIEWS


def test_train_and_evaluate_take_a_dicomweb_source(orthanc, tmp_path):
    import json

    from bonecluster.cli import main
    from tests.integration.test_engine import TINY

    run = tmp_path / "run"
    sets = [a for s in TINY + ["train.epochs=1", "cluster.k=3", "data.workers=1"] for a in ("--set", s)]
    assert main(["train", _source(orthanc.dicomweb), "--out", str(run), "--stages", "1", "--quiet", *sets]) == 0
    data = json.loads((run / "data.json").read_text())
    assert len(data["records"]) == N_INSTANCES
    assert len(list((run / "cache" / "dicomweb").rglob("*.dcm"))) == N_INSTANCES
    assert main(["evaluate", str(run), _source(orthanc.dicomweb), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["stage1"]["n_images"] == N_INSTANCES     # scored against BodyPartExamined


def test_a_multipart_answer_cut_short_inside_its_length_is_skipped(orthanc, tmp_path):
    paths, stats, skips = _fetch_through(orthanc, _instance_fault({6}, "cut-multipart"), tmp_path)
    assert len(paths) == N_INSTANCES - 1 and stats.skipped == 1
    assert "cut short" in skips.items[0].reason or "not a DICOM payload" in skips.items[0].reason
    assert len(list(tmp_path.rglob("*.dcm"))) == N_INSTANCES - 1       # no cut file left to be trusted later

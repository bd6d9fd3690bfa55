"""The viewer under load (issue 7): benchmarks/bench_serve.py with CI-sized numbers against the
tiny run, and the bound on concurrent decodes that putting the viewer under load made necessary."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import load_benchmark
from tests.integration.conftest import serve_in_thread

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

DOCUMENTED = {"ok", "failures", "clients", "requests", "duration_s", "requests_per_s", "latency_ms", "statuses",
              "connection_errors", "n_5xx", "unexpected_status", "bad_uploads", "by_kind", "valid_images",
              "part_agreement", "server", "settings", "machine"}
SERVER_FIELDS = {"pid", "peak_rss_mb", "rss_before_load_mb", "rss_after_load_mb", "open_fds_before_load",
                 "open_fds_after_load", "alive_after_load", "exceptions_logged", "log"}


@pytest.fixture
def run_copy(tiny_serve_run, tmp_path) -> Path:
    """The shared run, copied as hard links: names.json is only ever replaced (atomic write), never
    written in place, so renames under load leave the shared run as it was."""
    run = tmp_path / "run"
    try:
        shutil.copytree(tiny_serve_run[0], run, copy_function=os.link)
    except OSError:  # another file system, or no hard links
        shutil.copytree(tiny_serve_run[0], run)
    return run


def names_files(run: Path) -> dict[str, dict]:
    return {str(p.relative_to(run)): json.loads(p.read_text()) for p in sorted(run.glob("stage*/**/names.json"))}


def test_load_mix_gets_no_5xx_and_every_upload_answered_correctly(run_copy, tmp_path):
    names_before = names_files(run_copy)
    out = tmp_path / "load.json"
    res = load_benchmark("bench_serve").main([
        "--run", str(run_copy), "--clients", "4", "--requests", "80", "--duration", "60",
        "--max-upload-mb", "0.5", "--large-mp", "2", "--server-threads", "1", "--n-images", "7", "--jpegs", "1",
        "--mix", "upload=30,large=4,oversize=12,garbage=13,abort=4,clusters=12,image=15,rename=10",
        "--json", str(out), "--quiet"])
    assert res["ok"], "\n".join(res["failures"])
    assert res["n_5xx"] == 0 and res["connection_errors"] == {} and res["bad_uploads"] == 0
    assert res["unexpected_status"] == 0 and res["requests"] == 80
    assert {"upload", "oversize", "garbage", "abort", "clusters", "image"} <= set(res["by_kind"])
    assert res["by_kind"]["upload"]["statuses"] == {"200": res["by_kind"]["upload"]["count"]}
    assert res["by_kind"]["oversize"]["statuses"] == {"413": res["by_kind"]["oversize"]["count"]}
    assert set(res["by_kind"]["garbage"]["statuses"]) <= {"415", "422"}
    assert len(res["valid_images"]) == 8  # 7 PNGs, one per body part, and one of them as JPEG

    saved = json.loads(out.read_text())
    assert DOCUMENTED <= set(saved) and SERVER_FIELDS <= set(saved["server"])
    assert saved["requests"] == 80 and saved["requests_per_s"] > 0
    for lat in [saved["latency_ms"]] + [k["latency_ms"] for k in saved["by_kind"].values()]:
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert saved["server"]["alive_after_load"] and saved["server"]["exceptions_logged"] == 0
    if os.path.exists("/proc/self/status"):
        srv = saved["server"]
        assert srv["peak_rss_mb"] >= srv["rss_before_load_mb"] > 0
        # no temp file or socket left open per request (uploads are spooled to temp files)
        assert srv["open_fds_after_load"] <= srv["open_fds_before_load"] + 8
    # renames under load wrote each cluster's own name back: the files say what they said
    after = names_files(run_copy)
    assert set(names_before) <= set(after)
    for key, names in after.items():
        expected = names_before.get(key) or {str(c): f"cluster-{c}" for c in range(len(names))}  # new: defaults
        assert names == expected, key


def test_concurrent_uploads_are_decoded_at_most_max_decodes_at_once(tiny_serve_run, monkeypatch,
                                                                    single_torch_thread):
    """Regression: each upload used to be decoded as soon as it arrived, one per worker thread (up
    to 40 at once). A PNG of a few hundred KB can hold 64 MP, ~1 GB to decode, so a handful of
    concurrent uploads could take the machine's memory; now at most ``max_decodes`` decode at once
    and the others wait without a thread, while browsing is still answered."""
    from bonecluster.serve import app as app_module

    active = peak = 0
    count = threading.Lock()
    real = app_module.decode_scaled

    def slow_counting_decode(*args, **kwargs):
        nonlocal active, peak
        with count:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.25)
            return real(*args, **kwargs)
        finally:
            with count:
                active -= 1

    monkeypatch.setattr(app_module, "decode_scaled", slow_counting_decode)
    png = sorted(tiny_serve_run[1].glob("train/XR_HAND/**/*.png"))[0].read_bytes()
    app = app_module.create_app(tiny_serve_run[0], max_upload_bytes=2**20, max_decodes=2)
    statuses: list[int] = []
    finished: list[float] = []

    with serve_in_thread(app) as base:
        def upload():
            r = httpx.post(base + "/api/predict", files={"file": ("hand.png", png, "image/png")}, timeout=60)
            statuses.append(r.status_code)
            finished.append(time.monotonic())

        threads = [threading.Thread(target=upload) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # the uploads are queued now
        health = httpx.get(base + "/health", timeout=30)
        clusters = httpx.get(base + "/api/clusters", timeout=30)
        browsed = time.monotonic()
        for t in threads:
            t.join(60)
    assert statuses == [200] * 8
    assert 1 <= peak <= 2, f"{peak} uploads were decoded at once"
    assert health.status_code == 200 and clusters.status_code == 200
    assert browsed < max(finished)  # browsing did not wait for the queue of uploads
    with pytest.raises(ValueError):
        app_module.create_app(tiny_serve_run[0], max_decodes=0)

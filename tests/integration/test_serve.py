"""`bonecluster serve`'s app (FastAPI TestClient) on a tiny run folder trained once for the module."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonecluster.cli import main
from bonecluster.predict import ImagePrediction, Predictor
from tests.unit.dicom_utils import dicom_dataset, write_dicom

with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what the project pins
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

CAP = 256 * 1024  # upload limit of the test app: the phantoms are a few KB
PARTS = ["ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST"]


@pytest.fixture(scope="module")
def tiny(tiny_serve_run, single_torch_thread):
    return tiny_serve_run  # trained once per session (conftest.py), shared with test_serve_load.py


@pytest.fixture(scope="module")
def client(tiny):
    from bonecluster.serve import create_app

    app = create_app(tiny[0], max_upload_bytes=CAP)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def phantom_png(tiny) -> Path:
    return sorted(tiny[1].glob("train/XR_HAND/**/*.png"))[0]


def _post(client, data: bytes, name: str = "x.png", ctype: str = "image/png"):
    return client.post("/api/predict", files={"file": (name, data, ctype)})


def _is_png(response) -> Image.Image:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def _json_error(response, status: int | tuple[int, ...]) -> str:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert detail
    return detail if isinstance(detail, str) else json.dumps(detail)


# ----------------------------------------------------------------------------- pages and health


def test_health_and_page_served_locally(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["stage1"] is True and h["parts"] == PARTS
    assert h["n_training_images"] == 42 and h["max_upload_bytes"] == CAP
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.text) > 500
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "https://" not in text and "http://" not in text and "//cdn" not in text
    assert client.get("/static/index.html").status_code == 404  # only the listed assets


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    for path in ("/health", "/api/predict", "/api/clusters", "/api/clusters/stage1/{cluster}/name",
                 "/api/clusters/stage2/{part}/{cluster}/name", "/api/images/{index}.png",
                 "/api/results/{rid}/heatmap.png"):
        assert path in spec["paths"], path
    body = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["file"]["format"] == "binary"
    assert client.get("/docs").status_code == 404  # Swagger UI would load scripts from a CDN


# ----------------------------------------------------------------------------- predict


def test_predict_png_returns_prediction_heatmap_and_neighbours(client, phantom_png):
    r = _post(client, phantom_png.read_bytes(), name="..\\dir/../../evil\u202ename.png")
    assert r.status_code == 200, r.text
    d = r.json()
    assert {f.name for f in dataclasses.fields(ImagePrediction)} <= set(d)
    assert d["path"] == "evilname.png"  # display name only: no folders, no control characters
    assert d["cluster_name"] and 0 < d["confidence"] <= 1
    assert d["part"] in PARTS and d["score"] >= 0 and d["threshold"] > 0
    assert d["abnormal"] == (d["score"] >= d["threshold"])
    assert d["stage2_cluster"] in (0, 1) and d["stage2_cluster_name"] == f"cluster-{d['stage2_cluster']}"
    # the default refinement makes the score a HOG model; the map explains the kNN seed
    assert d["heatmap_target"] == "knn-distance-seed" and d["heatmap_layer"].startswith("layer")
    heat = _is_png(client.get(d["heatmap_url"]))
    assert heat.mode == "RGBA" and heat.size == (256, 256)
    assert _is_png(client.get(d["image_url"])).size == (256, 256)
    assert len(d["neighbours"]) == 8
    sims = [n["similarity"] for n in d["neighbours"]]
    assert sims == sorted(sims, reverse=True)
    assert sims[0] == pytest.approx(1.0, abs=1e-3)  # a training image finds itself first
    assert d["in_distribution"] is True and 0 <= d["typicality"] <= 100   # it is typical of itself
    for n in d["neighbours"]:
        assert _is_png(client.get(n["url"])).size == (32, 32)
        assert n["cluster_name"] and n["url"] == f"/api/images/{n['index']}.png"
    again = client.get(f"/api/results/{d['id']}").json()
    assert again["score"] == d["score"] and again["heatmap_url"] == d["heatmap_url"]


def test_predict_dicom(client, phantom_png, tmp_path):
    pixels = np.asarray(Image.open(phantom_png).convert("L"), np.uint16) * 200
    path = write_dicom(tmp_path / "hand.dcm", pixels)
    r = _post(client, path.read_bytes(), name="hand.dcm", ctype="application/dicom")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["cluster"] is not None and d["path"] == "hand.dcm" and len(d["neighbours"]) == 8
    if d["part"] is not None:
        assert _is_png(client.get(d["heatmap_url"])).mode == "RGBA"
    # the same DICOM without its .dcm name is recognised by its preamble
    assert _post(client, path.read_bytes(), name="upload", ctype="application/octet-stream").status_code == 200


def test_results_are_kept_in_a_bounded_lru(client, phantom_png):
    viewer = client.app.state.viewer
    saved, viewer.max_results = viewer.max_results, 2
    try:
        ids = [_post(client, phantom_png.read_bytes()).json()["id"] for _ in range(3)]
        assert client.get(f"/api/results/{ids[0]}").status_code == 404
        assert client.get(f"/api/results/{ids[2]}/heatmap.png").status_code == 200
        assert len(viewer.results) == 2
    finally:
        viewer.max_results = saved


# ----------------------------------------------------------------------------- clusters and names


def test_cluster_listing_covers_both_stages(client):
    d = client.get("/api/clusters", params={"per_cluster": 3}).json()
    keys = [s["key"] for s in d["stages"]]
    assert keys == ["stage1"] + [f"stage2/{p}" for p in PARTS]
    stage1 = d["stages"][0]
    assert len(stage1["clusters"]) == 7 and sum(c["size"] for c in stage1["clusters"]) == 42
    assert all(len(c["images"]) <= 3 for c in stage1["clusters"])
    for stage in d["stages"][1:]:
        assert stage["images_available"] and stage["threshold"] > 0
        assert sum(c["size"] for c in stage["clusters"]) == 6  # 42 phantoms / 7 parts
    first = stage1["clusters"][0]
    assert first["rename_url"] == "/api/clusters/stage1/0/name"
    assert _is_png(client.get(d["image_url_template"].format(index=first["images"][0]))).mode == "L"
    assert client.get("/api/clusters", params={"per_cluster": 100000}).status_code == 422


def test_stage1_clusters_list_their_central_and_edge_images(client, tiny):
    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.typicality import Typicality

    d = client.get("/api/clusters", params={"per_cluster": 500}).json()
    trained = TrainedClusters.load(tiny[0] / "stage1")
    bank = Typicality.load(tiny[0] / "stage1" / "typicality.npz").bank
    distance = (bank - trained.centroids.float()[torch.from_numpy(trained.assignments)]).pow(2).sum(1)
    for c in d["stages"][0]["clusters"]:
        members, central, edge = set(c["images"]), c["central"], c["edge"]
        assert len(members) == c["size"] and len(central) == min(12, c["size"])
        assert len(edge) == min(4, c["size"] - len(central)) and not set(edge) & set(central)
        assert set(central) | set(edge) <= members
        ranked = [distance[i].item() for i in central] + sorted((distance[i].item() for i in members - set(central)))
        assert ranked == sorted(ranked)   # nearest first, and every central film nearer than the rest
        assert [distance[i].item() for i in edge] == sorted(ranked, reverse=True)[:len(edge)]   # farthest first
    assert all("central" not in c for s in d["stages"][1:] for c in s["clusters"])


def test_naming_persists_and_a_new_predictor_sees_it(client, tiny, phantom_png):
    run = tiny[0]
    names_file = run / "stage1" / "names.json"
    original = json.loads(names_file.read_text())
    d = _post(client, phantom_png.read_bytes()).json()
    cluster = d["cluster"]
    try:
        r = client.post(f"/api/clusters/stage1/{cluster}/name", json={"name": "  Hands, left & right  "})
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "Hands, left & right"
        assert json.loads(names_file.read_text())[str(cluster)] == "Hands, left & right"
        assert Predictor(run).names[cluster] == "Hands, left & right"
        assert _post(client, phantom_png.read_bytes()).json()["cluster_name"] == "Hands, left & right"
        listed = client.get("/api/clusters").json()["stages"][0]["clusters"][cluster]
        assert listed["name"] == "Hands, left & right"
    finally:
        assert client.post(f"/api/clusters/stage1/{cluster}/name",
                           json={"name": original[str(cluster)]}).status_code == 200
    assert json.loads(names_file.read_text()) == original

    part_names = run / "stage2" / "WRIST" / "names.json"
    assert not part_names.exists()
    r = client.post("/api/clusters/stage2/WRIST/1/name", json={"name": "wrist <i>cast & \"splint\""})
    assert r.status_code == 200, r.text
    assert json.loads(part_names.read_text()) == {"0": "cluster-0", "1": "wrist <i>cast & \"splint\""}
    wrist = [s for s in client.get("/api/clusters").json()["stages"] if s["key"] == "stage2/WRIST"][0]
    assert wrist["clusters"][1]["name"] == "wrist <i>cast & \"splint\""


@pytest.mark.parametrize("body", [
    {"name": ""}, {"name": "   "}, {"name": "x" * 65}, {"name": "x" * 5000}, {"name": "a\x00b"},
    {"name": "a\nb"}, {"name": "tab\there"}, {"name": "\u202eevil"}, {"name": "a/b"}, {"name": "..\\x"},
    {"name": 123}, {"name": None}, {"nom": "x"}, [], "just a string",
])
def test_bad_names_are_refused(client, tiny, body):
    before = (tiny[0] / "stage1" / "names.json").read_text()
    _json_error(client.post("/api/clusters/stage1/0/name", json=body), 422)
    assert (tiny[0] / "stage1" / "names.json").read_text() == before


@pytest.mark.parametrize("url,status", [
    ("/api/clusters/stage1/99/name", 404), ("/api/clusters/stage1/-1/name", 422),
    ("/api/clusters/stage1/abc/name", 422), ("/api/clusters/stage1/1e3/name", 422),
    ("/api/clusters/stage1/99999999999999999999999/name", 422),
    ("/api/clusters/stage2/NOPE/0/name", 404), ("/api/clusters/stage2/WRIST/2/name", 404),
    ("/api/clusters/stage2/wrist/0/name", 404), ("/api/clusters/stage2/%2e%2e/0/name", 404),
    ("/api/clusters/stage2/..%2fstage1/0/name", 404), ("/api/clusters/stage3/0/name", 404),
    ("/api/clusters/stage2/WRIST/0/rename", 404),
])
def test_bad_cluster_ids_are_refused(client, tiny, url, status):
    before = (tiny[0] / "stage1" / "names.json").read_text()
    r = client.post(url, json={"name": "X"})
    assert r.status_code == status, (url, r.status_code, r.text)
    assert r.json()["detail"]
    assert (tiny[0] / "stage1" / "names.json").read_text() == before


def test_name_body_must_be_json(client):
    _json_error(client.post("/api/clusters/stage1/0/name", content=b"{not json",
                            headers={"content-type": "application/json"}), 422)
    _json_error(client.post("/api/clusters/stage1/0/name", content=b'{"name": "X"}',
                            headers={"content-type": "text/plain"}), 422)
    _json_error(client.post("/api/clusters/stage1/0/name", data={"name": "X"}), 422)


# ----------------------------------------------------------------------------- limits


def test_upload_over_the_cap_is_413(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(CAP + 10)
    assert "too large" in _json_error(_post(client, big), 413)
    # no Content-Length (chunked): counted while reading
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n\x89PNG\r\n\x1a\n'
    chunks = (head if i == 0 else bytes(64 * 1024) for i in range(9))
    r = client.post("/api/predict", content=chunks,
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert "too large" in _json_error(r, 413)
    # a lying Content-Length is refused before the body is read
    r = client.post("/api/predict", content=b"--xyz--\r\n",
                    headers={"content-type": "multipart/form-data; boundary=xyz", "content-length": str(CAP + 1)})
    assert r.status_code in (400, 413)


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


def test_non_images_are_415_and_broken_images_422(client, phantom_png, tmp_path):
    assert "not an image" in _json_error(_post(client, b"hello, world\n" * 20, name="notes.txt"), 415)
    assert "DICOM" in _json_error(_post(client, b"plain text" * 20, name="x.dcm"), 415)
    pickled = b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." * 3
    _json_error(_post(client, pickled, name="model.pt"), 415)
    data = phantom_png.read_bytes()
    assert "corrupt" in _json_error(_post(client, data[: len(data) // 2]), 422)
    assert "empty" in _json_error(_post(client, b""), 422)
    assert "too large" in _json_error(_post(client, _png_header(100_000, 100_000)), 422)
    assert "too large" in _json_error(_post(client, _png_header(9000, 9000)), 422)  # 81 MP: over the run's 64 MP pixel cap
    ds = dicom_dataset(np.zeros((4, 4), np.uint16))
    ds.Rows, ds.Columns = 60000, 60000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert "too large" in _json_error(_post(client, buf.getvalue(), name="huge.dcm"), 422)


def test_malformed_requests_never_get_a_500(client, phantom_png):
    png = phantom_png.read_bytes()
    mp = "multipart/form-data; boundary=xyz"
    requests = [
        ("post", "/api/predict", {}, (415,)),                                           # no body at all
        ("post", "/api/predict", {"json": {"file": "x"}}, (415,)),                      # not multipart
        ("post", "/api/predict", {"content": png, "headers": {"content-type": "image/png"}}, (415,)),
        ("post", "/api/predict", {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}, (400,)),
        ("post", "/api/predict", {"content": b"garbage\r\n\r\n--", "headers": {"content-type": mp}}, (400, 422)),
        ("post", "/api/predict", {"content": b"--xyz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--xyz--\r\n",
                                  "headers": {"content-type": mp}}, (400,)),         # part without a name
        ("post", "/api/predict", {"content": b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
                                             b"filename=\"a.png\"\r\n\r\n" + png[:100],
                                  "headers": {"content-type": mp}}, (400, 422)),   # cut before the end
        ("post", "/api/predict", {"content": b"", "headers": {"content-type": mp}}, (400, 422)),
        ("post", "/api/predict", {"files": {"other": ("a.png", png, "image/png")}}, (422,)),  # missing field
        ("post", "/api/predict", {"data": {"file": "not a file"}}, (415, 422)),       # urlencoded text field
        ("post", "/api/predict", {"files": {"file": (None, b"text value")}}, (422,)),  # text, not a file
        ("post", "/api/predict", {"files": [("file", ("a.png", png, "image/png")),
                                            ("file", ("b.png", png, "image/png"))]}, (400,)),  # two files
        ("post", "/api/predict", {"content": b"x", "headers": {"content-type": mp, "content-length": "abc"}},
         (400,)),
        ("get", "/api/predict", {}, (405,)), ("put", "/api/predict", {}, (405,)),
        ("delete", "/api/clusters", {}, (405,)), ("post", "/api/images/0.png", {}, (405,)),
        ("get", "/api/clusters/stage1/0/name", {}, (405,)),
        ("get", "/api/results/nothex", {}, (422,)), ("get", "/api/results/" + "0" * 32, {}, (404,)),
        ("get", "/api/results/" + "0" * 32 + "/heatmap.png", {}, (404,)),
        ("get", "/api/images/abc.png", {}, (422,)), ("get", "/api/images/1e2.png", {}, (422,)),
        ("get", "/api/images/42.png", {}, (404,)), ("get", "/api/images/0.jpg", {}, (404,)),
        ("get", "/api/images/99999999999999999999999999.png", {}, (422,)),
        ("get", "/no/such/route", {}, (404,)),
    ]
    for method, url, kwargs, statuses in requests:
        r = getattr(client, method)(url, **kwargs)
        assert r.status_code in statuses, (method, url, r.status_code, r.text)
        assert r.status_code < 500 and r.json()["detail"]


# ----------------------------------------------------------------------------- path traversal


@pytest.mark.parametrize("url", [
    "/api/images/../../../../etc/passwd", "/api/images/..%2f..%2f..%2fetc%2fpasswd.png",
    "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd.png", "/api/images/%2fetc%2fpasswd.png",
    "/api/images//etc/passwd.png", "/api/images/..%5c..%5cdata.json.png", "/api/images/0.png%00.txt",
    "/api/images/%252e%252e%252fdata.json.png", "/api/images/0.png/../../data.json",
    "/static/..%2f..%2f..%2fpyproject.toml", "/static/%2e%2e/app.py", "/static/../serve/app.py",
    "/static/%2fetc%2fpasswd", "/static/..%5capp.py", "/static/app.js%00.png", "/static//etc/passwd",
    "/api/results/..%2f..%2fdata.json", "/api/results/%2e%2e/heatmap.png",
    "/api/results/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2fdata.json",
    "/api/images/" + "%2e%2e%2f" * 10 + "etc%2fpasswd.png",
])
def test_no_route_resolves_outside_the_run(client, url):
    r = client.get(url)
    assert r.status_code in (404, 405, 422), (url, r.status_code)
    assert b"root:" not in r.content and b"[project]" not in r.content and b'"records"' not in r.content


def test_foreign_host_header_is_refused(client):
    r = client.get("/health", headers={"host": "attacker.example"})
    assert r.status_code == 400


def test_cli_parses_serve_defaults(tiny):
    from bonecluster.cli import build_parser

    args = build_parser().parse_args(["serve", str(tiny[0])])
    assert (args.host, args.port, args.max_upload_mb) == ("127.0.0.1", 8000, 50)
    assert main(["serve", str(tiny[0]), "--max-upload-mb", "0"]) == 1
    assert main(["serve", str(tiny[0] / "missing")]) == 1


def test_pixel_cap_override_refuses_an_upload_the_run_would_take(tiny, phantom_png):
    """``limits`` (serve --max-pixels) tightens the run's pixel cap for uploads."""
    from bonecluster.serve import create_app

    side = Image.open(phantom_png).size
    app = create_app(tiny[0], max_upload_bytes=CAP, limits={"pixel_cap": side[0] * side[1] - 1})
    with TestClient(app, base_url="http://127.0.0.1") as c:
        reason = _json_error(_post(c, phantom_png.read_bytes()), 422)
    assert "exceeds pixel cap" in reason
    with pytest.raises(ValueError, match="pixel_cap"):
        create_app(tiny[0], limits={"pixel_cap": 0})


def test_serve_cli_passes_limit_flags(monkeypatch, tiny):
    import bonecluster.serve
    from bonecluster.cli import main

    seen = {}
    monkeypatch.setattr(bonecluster.serve, "serve", lambda run, **kw: seen.update(kw))
    assert main(["serve", str(tiny[0]), "--max-pixels", "1000", "--max-frames", "2", "--max-decodes", "3"]) == 0
    assert seen["limits"] == {"pixel_cap": 1000, "max_frames": 2} and seen["max_decodes"] == 3

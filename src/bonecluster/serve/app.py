"""The web viewer: a FastAPI app over one run folder, plus one static page (no CDN, no framework).

Routes (the JSON API is described by FastAPI's OpenAPI schema at ``/openapi.json``; the
Swagger/ReDoc pages are off because they load their scripts from a CDN)::

    GET  /                                   the viewer page (static/index.html, app.js, style.css)
    GET  /health                             {"status": "ok", ...}: what the run holds
    POST /api/predict                        multipart field ``file`` (PNG, JPEG or DICOM): the
                                             ImagePrediction fields + stage-2 cluster, heatmap URL,
                                             8 nearest training images
    GET  /api/results/{id}                   a recent prediction again (in-memory LRU, random id)
    GET  /api/results/{id}/image.png         the decoded upload, as the page shows it
    GET  /api/results/{id}/heatmap.png       its Grad-CAM overlay (RGBA, same size)
    GET  /api/clusters                       every stage-1 and stage-2 cluster: name, size, images
                                             (stage 1 also: its 12 most central and 4 edge images)
    POST /api/clusters/stage1/{id}/name      {"name": "..."} -> RUN/stage1/names.json
    POST /api/clusters/stage2/{part}/{id}/name   -> RUN/stage2/<PART>/names.json
    GET  /api/images/{index}.png             training image ``index`` (row of RUN/data.json) from the cache

Cluster keys: ``stage1`` for the body-part clusters, ``stage2/<PART>`` for a part's clusters
(``<PART>`` is one of the run's stage-2 folders; nothing else is accepted).

Safety: images are only ever read from the run's decode-once cache by integer index, results by
random id from memory, and static files from a fixed list, so no request names a file path.
Uploads are counted while they stream in and refused above ``max_upload_bytes`` (413); they are
decoded only by the project's decoders (Pillow restricted to PNG/JPEG/TIFF/BMP, pydicom) under the
run's pixel cap; nothing a user sends is unpickled. Decoding a large image takes memory (about 16
bytes per pixel at its peak: ~1 GB at the default 64 MP pixel cap, from a PNG of under 200 KB), so
at most ``max_decodes`` uploads are decoded at once and one at a time is in the models; uploads
waiting for either hold no worker thread, so browsing stays responsive while uploads queue
(benchmarks/bench_serve.py puts the viewer under load). Non-images get 415, broken or oversized
images 422, malformed requests 400/422, each with a JSON ``detail``. Model files are read with
``weights_only=True``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import secrets
import shutil
import tempfile
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from bonecluster import __version__
from bonecluster.data.cache import PreparedDataset, store_dir_for
from bonecluster.data.decode import decode_scaled, fit_to_square
from bonecluster.data.records import Record, SkipError
from bonecluster.gradcam import colourise, grad_cam, knn_distance_target
from bonecluster.names import NAMES, load_cluster_names, name_cluster, save_cluster_names
from bonecluster.predict import Predictor
from bonecluster.stage2.parts import group_by_part
from bonecluster.stage2.scoring import embed_images

log = logging.getLogger("bonecluster")

DEFAULT_MAX_UPLOAD = 50 * 2**20
DEFAULT_MAX_DECODES = 2   # uploads decoded at once: each may take ~16 bytes per pixel up to the pixel cap
NEIGHBOURS = 8
NAMING_CENTRAL, NAMING_EDGE = 12, 4   # films per stage-1 cluster in the naming flow
DISPLAY_SIZE = 256        # side of the image and heatmap the page shows
NAME_MAX = 64             # as names.name_cluster allows
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
DICOM_NAMES = (".dcm", ".dicom")
RESULT_ID = r"^[0-9a-f]{32}$"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


class ClusterName(BaseModel):
    name: str = Field(..., max_length=1024, description=f"1-{NAME_MAX} characters, no slashes or control characters")


class _TooLarge(Exception):
    pass


@dataclass
class _Result:
    prediction: dict
    image_png: bytes
    heatmap_png: bytes | None


@dataclass
class _OneImage:
    """The two things Predictor needs from a dataset (``records`` and ``images()``), for one upload."""

    image: np.ndarray  # uint8 (S, S)
    records: list[Record] = field(default_factory=list)

    def __len__(self) -> int:
        return 1

    def images(self) -> np.ndarray:
        return self.image[None]


class ViewerState:
    """A run folder's models, training images and recent results, shared by the routes."""

    def __init__(self, run: str | Path, max_upload_bytes: int, max_results: int,
                 max_decodes: int = DEFAULT_MAX_DECODES, limits: dict | None = None):
        self.run = Path(run)
        self.predictor = Predictor(self.run)
        any_model = self.predictor.stage1 or next(iter(self.predictor.parts.values()))[0]
        self.cfg = any_model.cfg
        self.max_upload_bytes = max_upload_bytes
        # The run's pixel and frame limits (or ``limits``' overrides); the upload cap bounds the file.
        data_cfg = self.cfg.data.with_limits(**(limits or {}))
        self.limits = dataclasses.replace(data_cfg.limits(), max_file_bytes=max(1, max_upload_bytes))
        self.data = self._load_data()
        self.pre = self.data.pre if self.data is not None else self.cfg.data.preprocess()
        self.pixels = self._open_pixels()
        self.n_images = len(self.data) if self.pixels is not None else 0
        self.part_positions = self._part_positions()
        self.lock = threading.Lock()           # one model pass at a time (Grad-CAM hooks the modules)
        self.results: OrderedDict[str, _Result] = OrderedDict()
        self.max_results = max_results
        self._train_embeddings: torch.Tensor | None = None
        self.max_decodes = max_decodes
        self._gates: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore, asyncio.Lock] | None = None

    # -- the run's training images ------------------------------------------------------------

    def _load_data(self) -> PreparedDataset | None:
        path = self.run / "data.json"
        if not path.is_file():
            log.warning("%s: no data.json; the viewer shows no training images", self.run)
            return None
        try:
            return PreparedDataset.load(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s: cannot read (%s); the viewer shows no training images", path, err)
            return None

    def _open_pixels(self) -> np.ndarray | None:
        if self.data is None or len(self.data) == 0:
            return None
        for store in (self.data.store_dir, store_dir_for(self.run / "cache", self.data.pre)):
            try:
                pixels = PreparedDataset(Path(store), self.data.pre, self.data.records, self.data.rows).pixels()
            except (OSError, RuntimeError):
                continue
            self.data.store_dir = Path(store)
            return pixels
        log.warning("%s: the training images' cache is missing; the viewer shows no training images", self.run)
        return None

    def training_image(self, index: int) -> np.ndarray:
        return np.asarray(self.pixels[self.data.rows[index]])

    def stage1_assignments(self) -> np.ndarray | None:
        s1 = self.predictor.stage1
        if s1 is None or self.pixels is None or len(s1.assignments) != self.n_images:
            return None
        return s1.assignments

    def _part_positions(self) -> dict[str, np.ndarray | None]:
        """Positions (into the training images) of each stage-2 part model's images, in its order.

        Stage 2 grouped images by their metadata body part, else by their stage-1 cluster name
        (see stage2.parts.group_by_part); a part whose regrouping does not match its model's image count
        (data or names changed since training) gets None and no gallery.
        """
        groups: dict[str, np.ndarray] = {}
        s1 = self.stage1_assignments()
        if self.pixels is not None:
            names = None if s1 is None else [self.predictor.names.get(int(c), f"cluster-{int(c)}") for c in s1]
            try:
                groups = group_by_part(self.data, names)
            except ValueError:  # images without a part and no stage 1 to name them
                groups = {}
        out: dict[str, np.ndarray | None] = {}
        for part, (trained, _) in self.predictor.parts.items():
            found = groups.get(part)
            out[part] = found if found is not None and len(found) == len(trained.assignments) else None
        return out

    def train_embeddings(self) -> torch.Tensor | None:
        """Stage-1 embeddings of every training image (computed on first use; call under the lock)."""
        if self._train_embeddings is None and self.stage1_assignments() is not None:
            kept = self.predictor.typicality   # the same embeddings, kept at training time
            if kept is not None and len(kept.bank) == self.n_images:
                self._train_embeddings = kept.bank
            else:
                images = np.asarray(self.pixels[self.data.rows])
                self._train_embeddings = embed_images(self.predictor.stage1, images)
        return self._train_embeddings

    # -- names --------------------------------------------------------------------------------

    def stage2_names(self, part: str) -> dict[int, str]:
        trained = self.predictor.parts[part][0]
        names = {c: f"cluster-{c}" for c in range(trained.n_clusters)}
        folder = self.run / "stage2" / part
        if (folder / NAMES).is_file():
            try:
                names.update(load_cluster_names(folder))
            except (OSError, ValueError, AttributeError):
                log.warning("%s: unreadable; using default names", folder / NAMES)
        return names

    # -- one upload ---------------------------------------------------------------------------

    def gates(self) -> tuple[asyncio.Semaphore, asyncio.Lock]:
        """The running event loop's (decode slots, model turn): asyncio primitives, so that an
        upload waiting for its turn holds no worker thread (made anew if the loop changes)."""
        loop = asyncio.get_running_loop()
        if self._gates is None or self._gates[0] is not loop:
            self._gates = (loop, asyncio.Semaphore(self.max_decodes), asyncio.Lock())
        return self._gates[1], self._gates[2]

    def decode(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One uploaded file at stage 1's size, at stage 2's (``stage2.size``; the same array when
        they are one) and at the page's, uint8 (raises SkipError).

        The full-size intermediates (~16 bytes per pixel at the peak) are freed on return.
        """
        scaled = decode_scaled(path, self.pre, self.limits)
        small = fit_to_square(scaled, self.pre.size, self.pre.fit)
        part = self.predictor.stage2_pre
        part_film = small if part is None or part == self.pre else fit_to_square(scaled, part.size, part.fit)
        return small, part_film, fit_to_square(scaled, DISPLAY_SIZE, self.pre.fit)

    def predict_decoded(self, small: np.ndarray, display: np.ndarray, filename: str,
                        part_film: np.ndarray | None = None) -> _Result:
        """Predict, explain and find neighbours for one decoded upload (one model pass at a time).
        ``part_film``: the upload at stage 2's size (``small`` when not given)."""
        part_film = small if part_film is None else part_film
        with self.lock, torch.no_grad():
            pred, emb = self.predictor.predict_with_embeddings(_OneImage(small, [Record(filename)]),
                                                               use_metadata_parts=False,
                                                               stage2_data=_OneImage(part_film, [Record(filename)]))
            pred = pred[0]
            out = pred.to_dict()
            out.update(stage2_cluster=None, stage2_cluster_name=None, heatmap_layer=None,
                       heatmap_target=None, neighbours=self._neighbours(emb))
            heatmap = None
            if pred.part is not None:
                trained, anomaly = self.predictor.parts[pred.part]
                label, _ = trained.assign(embed_images(trained, part_film[None]))
                out["stage2_cluster"] = int(label[0])
                out["stage2_cluster_name"] = self.stage2_names(pred.part).get(int(label[0]))
                pca = anomaly.pca if anomaly.pca is not None else trained.pca
                if trained.model.cam_layers():   # a backbone with no map to explain gets no heatmap
                    cam, layer = grad_cam(trained.model, part_film, knn_distance_target(anomaly.bank, pca, anomaly.knn))
                    heatmap = _png(colourise(_resize_map(cam[0], DISPLAY_SIZE)))
                    # A refined part's score is a HOG model; the map shows the kNN distance that seeded it.
                    out.update(heatmap_layer=layer,
                               heatmap_target="knn-distance" if anomaly.refiner is None else "knn-distance-seed")
        return _Result(out, _png(display), heatmap)

    def _neighbours(self, emb: np.ndarray | None) -> list[dict]:
        bank = self.train_embeddings()
        if emb is None or bank is None or len(bank) == 0:
            return []
        sims = bank @ torch.as_tensor(emb[0], dtype=bank.dtype)
        top = sims.topk(min(NEIGHBOURS, len(bank)))
        s1 = self.stage1_assignments()
        out = []
        for sim, idx in zip(top.values.tolist(), top.indices.tolist()):
            c = int(s1[idx])
            rec = self.data.records[idx]
            out.append({"index": idx, "url": f"/api/images/{idx}.png", "similarity": round(float(sim), 4),
                        "cluster": c, "cluster_name": self.predictor.names.get(c, f"cluster-{c}"),
                        "body_part": rec.body_part, "abnormal": rec.abnormal})
        return out

    def remember(self, result: _Result) -> str:
        rid = secrets.token_hex(16)
        with self.lock:
            self.results[rid] = result
            while len(self.results) > self.max_results:
                self.results.popitem(last=False)
        return rid

    def recall(self, rid: str) -> _Result:
        with self.lock:
            result = self.results.get(rid)
            if result is not None:
                self.results.move_to_end(rid)
        if result is None:
            raise HTTPException(404, "no such result (results are kept in memory for the most recent uploads)")
        return result

    # -- clusters -----------------------------------------------------------------------------

    def clusters(self, per_cluster: int) -> dict:
        stages = []
        s1 = self.predictor.stage1
        if s1 is not None:
            assignments = self.stage1_assignments()
            listing = self._stage_listing("stage1", "Stage 1: body parts", None, s1.n_clusters,
                                          self.predictor.names, assignments,
                                          np.arange(self.n_images) if assignments is not None else None,
                                          "/api/clusters/stage1/{id}/name", per_cluster)
            shown = self.central_and_edge(assignments)
            for c in listing["clusters"]:
                c["central"], c["edge"] = shown.get(c["id"], ([], []))
            stages.append(listing)
        for part, (trained, anomaly) in self.predictor.parts.items():
            positions = self.part_positions[part]
            listing = self._stage_listing(f"stage2/{part}", f"Stage 2: {part}", part, trained.n_clusters,
                                          self.stage2_names(part), trained.assignments if positions is not None
                                          else None, positions, f"/api/clusters/stage2/{part}/{{id}}/name",
                                          per_cluster)
            listing["threshold"] = anomaly.threshold
            stages.append(listing)
        return {"image_url_template": "/api/images/{index}.png", "n_training_images": self.n_images,
                "stages": stages}

    def central_and_edge(self, assignments: np.ndarray | None) -> dict[int, tuple[list[int], list[int]]]:
        """Per stage-1 cluster, the training images nearest its centroid (the nearest of its centroids
        with ``cluster.study_links``; NAMING_CENTRAL, nearest first) and the farthest ones (NAMING_EDGE, farthest first, none of them central): what
        the naming flow shows. Empty without the training images."""
        if assignments is None:
            return {}
        with self.lock:
            bank = self.train_embeddings()
        if bank is None:
            return {}
        stage1 = self.predictor.stage1
        distance = stage1.cluster_distances(bank, torch.from_numpy(np.asarray(assignments, np.int64))).numpy()
        out = {}
        for c in range(stage1.n_clusters):
            members = np.flatnonzero(assignments == c)
            order = members[np.argsort(distance[members], kind="stable")]
            central, rest = order[:NAMING_CENTRAL], order[NAMING_CENTRAL:]
            out[c] = ([int(i) for i in central], [int(i) for i in rest[::-1][:NAMING_EDGE]])
        return out

    @staticmethod
    def _stage_listing(key, title, part, k, names, assignments, positions, rename, per_cluster) -> dict:
        clusters = []
        for c in range(k):
            if assignments is not None:
                members = positions[np.flatnonzero(assignments == c)]
                size, images = int(len(members)), [int(i) for i in members[:per_cluster]]
            else:
                size, images = None, []
            clusters.append({"id": c, "name": names.get(c, f"cluster-{c}"), "size": size, "images": images,
                             "rename_url": rename.replace("{id}", str(c))})
        return {"key": key, "title": title, "part": part, "images_available": assignments is not None,
                "clusters": clusters}

    def rename(self, stage: str, part: str | None, cluster: int, name: str) -> dict:
        name = _clean_name(name)
        with self.lock:
            if part is None:
                if self.predictor.stage1 is None:
                    raise HTTPException(404, "this run has no stage-1 model")
                if cluster not in self.predictor.names:
                    raise HTTPException(404, f"stage1 has no cluster {cluster}")
                self.predictor.names = name_cluster(self.run, cluster, name, "stage1")
                names = self.predictor.names
            else:
                if part not in self.predictor.parts:
                    raise HTTPException(404, "no such stage-2 part")
                names = self.stage2_names(part)
                if cluster not in names:
                    raise HTTPException(404, f"stage2/{part} has no cluster {cluster}")
                folder = self.run / "stage2" / part
                if not (folder / NAMES).is_file():
                    save_cluster_names(folder, names)
                names = name_cluster(self.run, cluster, name, f"stage2/{part}")
        return {"stage": stage, "id": cluster, "name": names[cluster],
                "names": {str(k): v for k, v in sorted(names.items())}}


# ----------------------------------------------------------------------------- the app


def create_app(run: str | Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD, max_results: int = 64,
               allowed_hosts: Sequence[str] | None = None, max_decodes: int = DEFAULT_MAX_DECODES,
               limits: dict | None = None) -> FastAPI:
    """The viewer for ``run`` (a trained run folder).

    ``max_upload_bytes``: larger request bodies get 413. ``max_results``: recent uploads kept in
    memory. ``allowed_hosts``: Host header values answered (default 127.0.0.1 and localhost, a
    guard against DNS rebinding; ``["*"]`` for any). ``max_decodes``: uploads decoded at once
    (each can take ~16 bytes per pixel up to the run's pixel cap; more wait their turn).
    ``limits``: input-limit overrides of the run's config, e.g. ``{"pixel_cap": 4_000_000}``
    (see :class:`bonecluster.config.DataConfig`).
    """
    if max_upload_bytes < 1 or max_results < 1 or max_decodes < 1:
        raise ValueError("max_upload_bytes, max_results and max_decodes must be positive")
    state = ViewerState(run, max_upload_bytes, max_results, max_decodes, limits)
    page = _static_text("index.html")
    assets = {name: _static_text(name) for name in STATIC}

    app = FastAPI(title="bonecluster viewer", version=__version__, docs_url=None, redoc_url=None,
                  description="Upload a radiograph to see its body part, abnormality score, Grad-CAM "
                              "heatmap and nearest training images; browse and name the clusters.")
    app.state.viewer = state
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or DEFAULT_HOSTS))
    app.add_middleware(_SecurityHeaders)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, "no such file")
        return Response(assets[name], media_type=STATIC[name])

    @app.get("/health", summary="Liveness and what the run holds")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "run": state.run.name,
                "stage1": state.predictor.stage1 is not None, "parts": sorted(state.predictor.parts),
                "n_training_images": state.n_images, "image_size": state.pre.size,
                "max_upload_bytes": state.max_upload_bytes}

    @app.post("/api/predict", summary="Predict one uploaded image (multipart field `file`)",
              responses={400: {"description": "malformed multipart body"},
                         413: {"description": "upload larger than the limit"},
                         415: {"description": "not multipart, or not an image"},
                         422: {"description": "missing/empty file, or a broken or oversized image"}},
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["file"],
                  "properties": {"file": {"type": "string", "format": "binary",
                                          "description": "PNG, JPEG (also TIFF/BMP) or DICOM"}}}}}}})
    async def predict(request: Request) -> JSONResponse:
        decode_slots, model_turn = state.gates()
        with tempfile.TemporaryDirectory(prefix="bonecluster-upload-") as tmp:
            path, filename = await _receive_upload(request, state.max_upload_bytes, Path(tmp))
            try:
                async with decode_slots:  # bounds the memory of concurrent decodes
                    small, part_film, display = await run_in_threadpool(state.decode, path)
            except SkipError as err:
                reason = str(err)
                status = 415 if reason.startswith(("not an image", "unreadable DICOM: not a DICOM")) else 422
                raise HTTPException(status, f"cannot use this file: {reason}") from None
        async with model_turn:  # one model pass at a time, without a worker thread per waiter
            result = await run_in_threadpool(state.predict_decoded, small, display, filename, part_film)
        rid = state.remember(result)
        body = {"id": rid, **result.prediction, "image_url": f"/api/results/{rid}/image.png",
                "heatmap_url": f"/api/results/{rid}/heatmap.png" if result.heatmap_png else None}
        result.prediction = body
        return JSONResponse(body)

    @app.get("/api/results/{rid}", summary="A recent prediction again")
    def result(rid: str = PathParam(..., pattern=RESULT_ID)) -> dict:
        return state.recall(rid).prediction

    @app.get("/api/results/{rid}/image.png", summary="The decoded upload (PNG)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def result_image(rid: str = PathParam(..., pattern=RESULT_ID)) -> Response:
        return _png_response(state.recall(rid).image_png, private=True)

    @app.get("/api/results/{rid}/heatmap.png", summary="The Grad-CAM overlay (RGBA PNG)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def result_heatmap(rid: str = PathParam(..., pattern=RESULT_ID)) -> Response:
        png = state.recall(rid).heatmap_png
        if png is None:
            raise HTTPException(404, "no heatmap: no stage-2 model scored this image")
        return _png_response(png, private=True)

    @app.get("/api/clusters", summary="Every stage-1 and stage-2 cluster: name, size, training images")
    def clusters(per_cluster: int = Query(24, ge=0, le=500, description="image indices listed per cluster")) -> dict:
        return state.clusters(per_cluster)

    @app.post("/api/clusters/stage1/{cluster}/name", summary="Name a stage-1 cluster (RUN/stage1/names.json)")
    def name_stage1(body: ClusterName, cluster: int = PathParam(..., ge=0, le=1_000_000)) -> dict:
        return state.rename("stage1", None, cluster, body.name)

    @app.post("/api/clusters/stage2/{part}/{cluster}/name",
              summary="Name a stage-2 cluster of one part (RUN/stage2/<PART>/names.json)")
    def name_stage2(body: ClusterName, part: str = PathParam(..., max_length=64),
                    cluster: int = PathParam(..., ge=0, le=1_000_000)) -> dict:
        return state.rename(f"stage2/{part}", part, cluster, body.name)

    @app.get("/api/images/{index}.png", summary="A training image from the run's cache (PNG)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def training_image(index: int = PathParam(..., ge=0, le=2**40)) -> Response:
        if state.pixels is None or index >= state.n_images:
            raise HTTPException(404, "no such training image")
        return _png_response(_png(state.training_image(index)), private=False)

    return app


# ----------------------------------------------------------------------------- helpers


async def _receive_upload(request: Request, cap: int, tmp: Path) -> tuple[Path, str]:
    """Stream the multipart body (counting bytes against ``cap``) and save field ``file`` in ``tmp``.

    Returns the saved path and a display-safe file name. Raises HTTPException 400/413/415/422.
    """
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise HTTPException(415, "send the image as multipart/form-data with a field named 'file'")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise HTTPException(400, "bad Content-Length header")
        if int(length) > cap:
            raise HTTPException(413, f"upload too large: {int(length)} bytes, the limit is {cap}")

    async def counted():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                raise _TooLarge
            yield chunk

    parser = MultiPartParser(request.headers, counted(), max_files=1, max_fields=8, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except _TooLarge:
        raise HTTPException(413, f"upload too large: more than {cap} bytes") from None
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected during the upload") from None
    except MultiPartException as err:
        raise HTTPException(400, f"malformed multipart body: {err.message}") from None
    except Exception as err:  # noqa: BLE001 - whatever the multipart parser trips on is the body's fault
        raise HTTPException(400, f"malformed multipart body ({type(err).__name__})") from None
    try:
        upload = form.get("file")
        if upload is None:
            raise HTTPException(422, "the multipart field 'file' is missing")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "the multipart field 'file' must be a file, not a text value")
        filename = _safe_filename(upload.filename)
        suffix = ".dcm" if filename.lower().endswith(DICOM_NAMES) else ".upload"
        path = tmp / f"upload{suffix}"
        with open(path, "wb") as out:
            await run_in_threadpool(shutil.copyfileobj, upload.file, out)
        size = path.stat().st_size
        if size == 0:
            raise HTTPException(422, "the uploaded file is empty")
        if size > cap:
            raise HTTPException(413, f"upload too large: {size} bytes, the limit is {cap}")
        return path, filename
    finally:
        await form.close()


def _safe_filename(name: str | None) -> str:
    """The upload's base name for display: no folders, no control characters, at most 200 chars."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    return base[:200] or "upload"


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise HTTPException(422, "a cluster name cannot be empty")
    if len(name) > NAME_MAX:
        raise HTTPException(422, f"a cluster name has at most {NAME_MAX} characters, got {len(name)}")
    if any(unicodedata.category(c)[0] == "C" for c in name):
        raise HTTPException(422, "a cluster name cannot contain control or invisible format characters")
    if any(c in name for c in "/\\"):
        raise HTTPException(422, "a cluster name cannot contain slashes")
    return name


def _resize_map(cam: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(cam, np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0] \
        .clamp(0, 1).numpy()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _png_response(png: bytes, private: bool) -> Response:
    cache = "private, no-store" if private else "public, max-age=3600"
    return Response(png, media_type="image/png", headers={"Cache-Control": cache})


def _static_text(name: str) -> str:
    return resources.files("bonecluster.serve").joinpath("static", name).read_text(encoding="utf-8")


class _SecurityHeaders:
    """Pure ASGI middleware: CSP (only this origin's scripts, styles, images), nosniff, no framing."""

    HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + self.HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)

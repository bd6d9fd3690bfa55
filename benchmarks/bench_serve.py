"""Load on the viewer: N concurrent clients against a real `bonecluster serve` on 127.0.0.1.

    python benchmarks/bench_serve.py [--run RUN] [--clients 16] [--requests 2000] [--duration 120]
                                     [--max-upload-mb 2] [--images FILE...] [--json OUT]

Starts `python -m bonecluster serve RUN --port P --max-upload-mb X` in a subprocess (a free port,
its log in a file), waits for /health, sends every valid image once on its own (the baseline, which
also warms the server up), then runs ``--clients`` threads, each with its own keep-alive
connection, until ``--requests`` requests were sent or ``--duration`` seconds passed, whichever
comes first (0 turns either bound off). Without ``--run`` it first builds a tiny two-stage run on
42 phantoms (about 20 s on 2 cores) in a temporary folder.

Each request is drawn (seeded) from ``--mix``:

    upload    a valid image (phantom PNGs and JPEGs from the run's data, or --images): expect 200,
              a well-formed prediction, and the same prediction as the image's baseline (cluster,
              name, part, stage-2 cluster, abnormal flag, neighbours; scores to 1e-5). With
              probability --fetch-results the client then fetches the result's image.png and
              heatmap.png (kind "result", expect 200 PNG)
    large     a valid PNG of --large-mp megapixels that compresses to almost nothing (21 KB for
              16 MP: cheap to send, ~16 bytes of server memory per pixel to decode): expect 200
              and its baseline
    oversize  a body over the upload cap, half with a Content-Length and half streamed in chunks
              without one: expect 413
    garbage   random bytes, PNG magic plus random bytes, a truncated PNG, random bytes named .dcm,
              text, an empty file: expect 415 or 422
    abort     a valid upload cut off part-way: the client closes the socket (status "closed"); the
              server must neither log a traceback nor stop answering
    clusters  GET /api/clusters (expect 200, every stage listed)
    image     GET a training image of the gallery, /api/images/{i}.png (expect 200 PNG)
    rename    POST a cluster's *current* name to its rename URL (expect 200; rewrites names.json
              with the same content, so predictions do not change, but the file is rewritten while
              other clients read it; against your own --run it creates stage2/<PART>/names.json
              with the default names where there is none: leave rename out of --mix to avoid that)

It fails (exit 1, ``"ok": false``) on any 5xx, any connection error or timeout, any valid upload
not answered correctly, any status outside the ones expected above, a server that died, or a
traceback in the server's log. The server's memory comes from /proc: peak_rss_mb is the larger of
the kernel's high-water mark (VmHWM, warm-up included) and the VmRSS polled every 0.2 s, summed
over the server and any children.

JSON fields (``--json``): ok, failures, clients, requests (aborts included), duration_s,
requests_per_s, latency_ms {p50, p95, p99, mean, max} (answered requests: aborts left out),
statuses {code: count}, connection_errors {error: count}, n_5xx, unexpected_status, bad_uploads,
by_kind {kind: {count, requests_per_s, latency_ms, statuses}}, valid_images, part_agreement (share
of uploads whose predicted part is the image's known part; informative only), server {pid,
peak_rss_mb, rss_before_load_mb, rss_after_load_mb, open_fds_before_load, open_fds_after_load,
alive_after_load, exceptions_logged, log}, settings {...}, machine {cpus, load_average}.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
KINDS = ("upload", "large", "oversize", "garbage", "abort", "clusters", "image", "rename", "result")
DEFAULT_MIX = "upload=35,large=1,oversize=10,garbage=13,abort=2,clusters=15,image=19,rename=5"
EXPECTED = {"upload": {200}, "large": {200}, "oversize": {413}, "garbage": {415, 422}, "abort": {"closed"},
            "clusters": {200}, "image": {200}, "rename": {200}, "result": {200}}
# the tiny run the tests train (tests/integration/conftest.py): seconds on a laptop CPU
TINY_SETS = ["data.size=32", "train.batch_size=16", "train.feature_batch_size=64", "cluster.pca_dim=16",
             "cluster.backend=torch", "train.lr=0.01", "train.epochs=2", "stage2.k=2", "stage2.epochs=1",
             "stage2.min_images=4", "data.workers=1", "stage2.weights=same"]
PREDICTION_FIELDS = ("id", "path", "cluster", "cluster_name", "confidence", "part", "score", "threshold",
                     "abnormal", "study", "stage2_cluster", "stage2_cluster_name", "heatmap_layer",
                     "heatmap_target", "neighbours", "image_url", "heatmap_url")
SAME_FIELDS = ("cluster", "cluster_name", "part", "stage2_cluster", "stage2_cluster_name", "abnormal",
               "heatmap_layer", "threshold")
CLOSE_FIELDS = ("confidence", "score")
RID = re.compile(r"^[0-9a-f]{32}$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Upload:
    name: str
    data: bytes
    ctype: str
    part: str | None  # the known body part, when the image comes with one


@dataclass
class Tally:
    """What the clients saw; appended to under one lock."""

    latencies: dict = field(default_factory=lambda: defaultdict(list))   # kind -> seconds
    statuses: dict = field(default_factory=lambda: defaultdict(Counter))  # kind -> Counter(status)
    conn_errors: Counter = field(default_factory=Counter)                # "kind: ErrorName" -> n
    unexpected: int = 0
    bad_uploads: int = 0
    part_hits: int = 0
    part_known: int = 0
    failures: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, message: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(message)

    def wrong_answer(self, message: str) -> None:
        """A 200 whose body is wrong: a failure that also counts as an unexpected answer."""
        self.fail(message)
        with self.lock:
            self.unexpected += 1


# ----------------------------------------------------------------------------- the server


def build_tiny_run(root: Path, env: dict) -> Path:
    """42 phantoms and a two-stage run trained on them, as the serve tests make one."""
    ph, run = root / "ph", root / "run"
    for cmd in (["phantom", str(ph), "--n", "42", "--size", "64", "--seed", "5", "--workers", "1"],
                ["train", str(ph), "--out", str(run), "--quiet", *[a for s in TINY_SETS for a in ("--set", s)]]):
        done = subprocess.run([sys.executable, "-m", "bonecluster", *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bonecluster {cmd[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


def start_server(run: Path, max_upload_mb: float, env: dict, log_path: Path,
                 timeout: float) -> tuple[subprocess.Popen, str, dict]:
    """Start the viewer on a free port and wait for /health: (process, base URL, health)."""
    for _ in range(3):  # the port can be taken between choosing and binding it
        port = free_port()
        log = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "bonecluster", "serve", str(run), "--port", str(port),
                                 "--max-upload-mb", str(max_upload_mb)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(base + "/health", timeout=2)
                if r.status_code == 200:
                    return proc, base, r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        if proc.poll() is None:
            stop_server(proc)
            raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s; log:\n{tail(log_path)}")
        if "address already in use" not in tail(log_path).lower():
            break
    raise RuntimeError(f"the server exited with {proc.returncode}; log:\n{tail(log_path)}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on Ctrl-C
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class MemoryWatch(threading.Thread):
    """Polls the server's (and its children's) resident memory from /proc; Linux only."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss_kb = 0
        self.stop = threading.Event()

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        out = {}
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        out[key] = int(value.split()[0])
        except (OSError, ValueError, IndexError):
            pass
        return out

    def tree(self) -> list[int]:
        """The server's pid and its descendants' (from /proc/*/stat)."""
        parents: dict[int, list[int]] = defaultdict(list)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                parents[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(parents.get(pid, []))
        return found

    def sample(self) -> tuple[int, int]:
        """(current RSS, sum of high-water marks) over the process tree, in kB."""
        rss = hwm = 0
        for pid in self.tree():
            s = self._status(pid)
            rss += s.get("VmRSS", 0)
            hwm += s.get("VmHWM", 0)
        self.peak_rss_kb = max(self.peak_rss_kb, rss, hwm)
        return rss, hwm

    def open_fds(self) -> int | None:
        try:
            return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.tree())
        except OSError:
            return None

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)

    @property
    def available(self) -> bool:
        return os.path.exists(f"/proc/{self.pid}/status")


def mb(kb: int | None) -> float | None:
    return None if not kb else round(kb / 1024, 1)


# ----------------------------------------------------------------------------- what is sent


def valid_uploads(run: Path, images: list[str], n: int, jpegs: int) -> list[Upload]:
    """The user's images, or up to ``n`` of the run's training images spread over its body parts
    (plus ``jpegs`` of them re-encoded as JPEG)."""
    if images:
        out = []
        for i, p in enumerate(images):
            path = Path(p)
            dicom = path.suffix.lower() in (".dcm", ".dicom")
            out.append(Upload(f"{i:02d}-{path.name}", path.read_bytes(),
                              "application/dicom" if dicom else "application/octet-stream", None))
        return out
    try:
        records = json.loads((run / "data.json").read_text())["records"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"{run}: cannot list its training images ({err}); give --images") from None
    by_part: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        if Path(rec["path"]).is_file() and Path(rec["path"]).suffix.lower() in (".png", ".jpg", ".jpeg"):
            by_part[rec.get("body_part") or ""].append(rec)
    picked, parts = [], sorted(by_part)
    while len(picked) < n and any(by_part.values()):
        for part in parts:
            if by_part[part] and len(picked) < n:
                picked.append(by_part[part].pop(0))
    if not picked:
        raise SystemExit(f"{run}: none of its training images is on disk; give --images")
    out = [Upload(f"{i:02d}-{Path(r['path']).name}", Path(r["path"]).read_bytes(), "image/png",
                  r.get("body_part")) for i, r in enumerate(picked)]
    from PIL import Image

    for i, up in enumerate(out[:jpegs]):
        buf = io.BytesIO()
        Image.open(io.BytesIO(up.data)).convert("L").save(buf, format="JPEG", quality=90)
        out.append(Upload(f"{len(picked) + i:02d}-jpeg.jpg", buf.getvalue(), "image/jpeg", up.part))
    return out


def large_upload(megapixels: float) -> Upload:
    """A valid, highly compressible PNG of ``megapixels`` (21 KB for 16 MP): cheap to
    send, expensive to decode. Its pixel count must stay under the run's pixel cap."""
    from PIL import Image
    import numpy as np

    side = max(64, int(math.sqrt(megapixels * 1e6)))
    a = np.zeros((side, side), np.uint8)
    a[:, :256] = np.arange(256, dtype=np.uint8)[None, : min(256, side)]
    a[::97] = 200
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=9)
    return Upload(f"large-{side}x{side}.png", buf.getvalue(), "image/png", None)


def garbage_uploads(seed: int, sample_png: bytes) -> list[Upload]:
    rng = random.Random(seed)

    def noise(n: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(n))

    return [Upload("noise.png", noise(4096), "image/png", None),
            Upload("noise.bin", noise(65536), "application/octet-stream", None),
            Upload("magic.png", PNG_MAGIC + noise(2048), "image/png", None),
            Upload("truncated.png", sample_png[: max(len(PNG_MAGIC) + 1, len(sample_png) // 2)], "image/png", None),
            Upload("noise.dcm", noise(1024), "application/dicom", None),
            Upload("notes.txt", b"not an image at all\n" * 50, "text/plain", None),
            Upload("empty.png", b"", "image/png", None)]


def multipart_stream(boundary: str, size: int, chunk: int = 64 * 1024):
    """A multipart body of ``size`` zero bytes after a PNG signature, sent in chunks, no length."""
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
           f"Content-Type: image/png\r\n\r\n").encode() + PNG_MAGIC
    sent = 0
    block = bytes(chunk)
    while sent < size:
        yield block[: min(chunk, size - sent)]
        sent += chunk
    yield f"\r\n--{boundary}--\r\n".encode()


# ----------------------------------------------------------------------------- checks


def problem_with(d, up: Upload, health: dict, baseline: dict | None) -> str | None:
    """Why ``d`` is not a correct answer to ``up`` (None when it is)."""
    if not isinstance(d, dict):
        return "not a JSON object"
    missing = [k for k in PREDICTION_FIELDS if k not in d]
    if missing:
        return f"missing fields {missing}"
    if not (isinstance(d["id"], str) and RID.match(d["id"])):
        return f"bad id {d['id']!r}"
    if d["image_url"] != f"/api/results/{d['id']}/image.png":
        return f"bad image_url {d['image_url']!r}"
    if d["path"] != up.name:
        return f"path {d['path']!r} is not the file name sent ({up.name!r})"
    if health.get("stage1"):
        if not isinstance(d["cluster"], int) or not d["cluster_name"]:
            return f"no stage-1 cluster ({d['cluster']!r}, {d['cluster_name']!r})"
        if not (isinstance(d["confidence"], (int, float)) and 0 < d["confidence"] <= 1):
            return f"confidence {d['confidence']!r} not in (0, 1]"
    if d["part"] is not None:
        if d["part"] not in health.get("parts", []):
            return f"part {d['part']!r} is not one of the run's parts"
        for k in ("score", "threshold"):
            if not (isinstance(d[k], (int, float)) and math.isfinite(d[k])):
                return f"{k} {d[k]!r} is not a finite number"
        if d["abnormal"] != (d["score"] >= d["threshold"]):
            return f"abnormal={d['abnormal']} but score {d['score']} vs threshold {d['threshold']}"
        if not isinstance(d["stage2_cluster"], int) or d["heatmap_url"] != f"/api/results/{d['id']}/heatmap.png":
            return "a scored image without its stage-2 cluster or heatmap"
    n_train = health.get("n_training_images", 0)
    if not isinstance(d["neighbours"], list) or len(d["neighbours"]) > 8:
        return "neighbours is not a list of at most 8"
    for nb in d["neighbours"]:
        if not (isinstance(nb, dict) and isinstance(nb.get("index"), int) and 0 <= nb["index"] < n_train
                and nb.get("url") == f"/api/images/{nb['index']}.png"):
            return f"bad neighbour {nb!r}"
    if baseline is not None:
        for k in SAME_FIELDS:
            if d[k] != baseline[k]:
                return f"{k} {d[k]!r} differs from the baseline's {baseline[k]!r}"
        for k in CLOSE_FIELDS:
            a, b = d[k], baseline[k]
            if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)):
                return f"{k} {a!r} differs from the baseline's {b!r}"
        if [nb["index"] for nb in d["neighbours"]] != [nb["index"] for nb in baseline["neighbours"]]:
            return "neighbours differ from the baseline's"
    return None


def percentiles(values: list[float]) -> dict:
    """p50/p95/p99/mean/max in ms (linear interpolation between ranks, as numpy's default)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    xs = sorted(values)

    def q(p: float) -> float:
        pos = (len(xs) - 1) * p
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"p50": round(q(0.50) * 1e3, 1), "p95": round(q(0.95) * 1e3, 1), "p99": round(q(0.99) * 1e3, 1),
            "mean": round(sum(xs) / len(xs) * 1e3, 1), "max": round(xs[-1] * 1e3, 1)}


# ----------------------------------------------------------------------------- the clients


class Budget:
    """Hands out request slots until the count or the time runs out; draws each slot's kind."""

    def __init__(self, requests: int, duration: float, mix: dict[str, float], seed: int):
        self.left = requests if requests > 0 else math.inf
        self.deadline = math.inf
        self.duration = duration
        self.kinds, self.weights = list(mix), list(mix.values())
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def start(self) -> None:
        if self.duration > 0:
            self.deadline = time.monotonic() + self.duration

    def take(self, kind: str | None = None) -> str | None:
        """A kind to send next (``kind`` when given), or None when the budget is spent."""
        with self.lock:
            if self.left <= 0 or time.monotonic() >= self.deadline:
                return None
            self.left -= 1
            return kind or self.rng.choices(self.kinds, self.weights)[0]


class Client(threading.Thread):
    def __init__(self, cid: int, base: str, budget: Budget, tally: Tally, ctx: dict, start: threading.Barrier,
                 timeout: float):
        super().__init__(daemon=True)
        self.cid, self.base, self.budget, self.tally, self.ctx = cid, base, budget, tally, ctx
        self.start_barrier, self.timeout = start, timeout
        self.rng = random.Random(ctx["seed"] * 1000 + cid)

    def run(self) -> None:
        self.start_barrier.wait()
        try:
            with httpx.Client(base_url=self.base, timeout=self.timeout) as self.http:
                while (kind := self.budget.take()) is not None:
                    getattr(self, f"do_{kind}")()
        except Exception as err:  # a bug here must fail the run, not end it quietly
            self.tally.fail(f"client {self.cid} crashed: {type(err).__name__}: {err}")

    def send(self, kind: str, method: str, url: str, expect=None, **kwargs) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = self.http.request(method, url, **kwargs)
            r.read()
        except httpx.HTTPError as err:
            dt = time.perf_counter() - t0
            with self.tally.lock:
                self.tally.latencies[kind].append(dt)
                self.tally.statuses[kind]["connection error"] += 1
                self.tally.conn_errors[f"{kind}: {type(err).__name__}"] += 1
            self.tally.fail(f"{kind} {method} {url}: {type(err).__name__}: {err}")
            return None
        dt = time.perf_counter() - t0
        expected = expect or EXPECTED[kind]
        with self.tally.lock:
            self.tally.latencies[kind].append(dt)
            self.tally.statuses[kind][r.status_code] += 1
            if r.status_code not in expected:
                self.tally.unexpected += 1
        if r.status_code not in expected:
            self.tally.fail(f"{kind} {method} {url}: {r.status_code} (expected {sorted(expected)}): {r.text[:200]}")
        return r

    def do_large(self) -> None:
        self.do_upload("large")

    def do_upload(self, kind: str = "upload") -> None:
        up = self.rng.choice(self.ctx[kind])
        r = self.send(kind, "POST", "/api/predict", files={"file": (up.name, up.data, up.ctype)})
        if r is None:
            with self.tally.lock:
                self.tally.bad_uploads += 1
            return
        try:
            d = r.json() if r.status_code == 200 else None
        except ValueError:
            d = "not JSON"
        why = f"status {r.status_code}" if r.status_code != 200 else \
            problem_with(d, up, self.ctx["health"], self.ctx["baseline"].get(up.name))
        with self.tally.lock:
            if why is not None:
                self.tally.bad_uploads += 1
            elif up.part is not None:
                self.tally.part_known += 1
                self.tally.part_hits += d["part"] == up.part
        if why is not None:
            self.tally.fail(f"{kind} {up.name}: {why}")
            return
        if self.rng.random() < self.ctx["fetch_results"]:
            for url in (d["image_url"], d["heatmap_url"]):
                if url and self.budget.take("result"):
                    r = self.send("result", "GET", url)
                    if r is not None and r.status_code == 200 and not r.content.startswith(PNG_MAGIC):
                        self.tally.wrong_answer(f"result {url}: not a PNG")

    def do_oversize(self) -> None:
        cap = self.ctx["health"]["max_upload_bytes"]
        size = cap + 1 + self.rng.randrange(64 * 1024)
        if self.rng.random() < 0.5:
            self.send("oversize", "POST", "/api/predict",
                      files={"file": ("big.png", self.ctx["big"][:size], "image/png")})
        else:
            boundary = f"bench{self.rng.getrandbits(64):016x}"
            self.send("oversize", "POST", "/api/predict", content=multipart_stream(boundary, size),
                      headers={"content-type": f"multipart/form-data; boundary={boundary}"})

    def do_garbage(self) -> None:
        up = self.rng.choice(self.ctx["garbage"])
        self.send("garbage", "POST", "/api/predict", files={"file": (up.name, up.data, up.ctype)})

    def do_abort(self) -> None:
        up = self.rng.choice(self.ctx["upload"])
        boundary = f"bench{self.rng.getrandbits(64):016x}"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{up.name}"\r\n'
                f"Content-Type: {up.ctype}\r\n\r\n").encode() + up.data + f"\r\n--{boundary}--\r\n".encode()
        head = (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
        url = httpx.URL(self.base)
        t0 = time.perf_counter()
        try:
            with socket.create_connection((url.host, url.port), timeout=self.timeout) as sock:
                sock.sendall(head + body[: self.rng.randrange(1, len(body))])
            status = "closed"
        except OSError as err:
            status = "connection error"
            with self.tally.lock:
                self.tally.conn_errors[f"abort: {type(err).__name__}"] += 1
            self.tally.fail(f"abort: {type(err).__name__}: {err}")
        with self.tally.lock:
            self.tally.latencies["abort"].append(time.perf_counter() - t0)
            self.tally.statuses["abort"][status] += 1

    def do_clusters(self) -> None:
        r = self.send("clusters", "GET", "/api/clusters", params={"per_cluster": self.rng.choice([0, 8, 24])})
        if r is not None and r.status_code == 200:
            try:
                n = len(r.json()["stages"])
            except (ValueError, KeyError, TypeError):
                n = -1
            if n != self.ctx["n_stages"]:
                self.tally.wrong_answer(f"clusters: {n} stages listed, the baseline listed {self.ctx['n_stages']}")

    def do_image(self) -> None:
        gallery = self.ctx["gallery"]
        if not gallery:
            return self.do_clusters()
        r = self.send("image", "GET", f"/api/images/{self.rng.choice(gallery)}.png")
        if r is not None and r.status_code == 200 and not r.content.startswith(PNG_MAGIC):
            self.tally.wrong_answer("image: not a PNG")

    def do_rename(self) -> None:
        names = self.ctx["names"]
        if not names:
            return self.do_clusters()
        url, name = self.rng.choice(names)
        r = self.send("rename", "POST", url, json={"name": name})
        if r is not None and r.status_code == 200 and r.json().get("name") != name:
            self.tally.wrong_answer(f"rename {url}: answered {r.json().get('name')!r}, sent {name!r}")

    def do_result(self) -> None:  # only follows an upload; drawn on its own it is an upload
        self.do_upload()


# ----------------------------------------------------------------------------- main


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, weight = item.partition("=")
        if kind not in KINDS or kind == "result":
            raise argparse.ArgumentTypeError(f"unknown request kind {kind!r} (use {', '.join(KINDS[:-1])})")
        mix[kind] = float(weight or 1)
        if mix[kind] < 0:
            raise argparse.ArgumentTypeError(f"{kind}: negative weight")
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("the mix needs some positive weight")
    return {k: w for k, w in mix.items() if w > 0}


def summarise(tally: Tally, seconds: float) -> dict:
    all_lat = [x for kind, xs in tally.latencies.items() for x in xs if kind != "abort"]  # answered ones
    n = sum(len(xs) for xs in tally.latencies.values())
    statuses = Counter()
    for c in tally.statuses.values():
        statuses.update(c)
    by_kind = {}
    for kind in KINDS:
        if tally.latencies.get(kind):
            lat = tally.latencies[kind]
            by_kind[kind] = {"count": len(lat), "requests_per_s": round(len(lat) / seconds, 1),
                             "latency_ms": percentiles(lat),
                             "statuses": {str(k): v for k, v in sorted(tally.statuses[kind].items(), key=str)}}
    return {"requests": n, "duration_s": round(seconds, 2),
            "requests_per_s": round(n / seconds, 1) if seconds > 0 else None,
            "latency_ms": percentiles(all_lat),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "connection_errors": dict(tally.conn_errors),
            "n_5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
            "unexpected_status": tally.unexpected, "bad_uploads": tally.bad_uploads,
            "part_agreement": round(tally.part_hits / tally.part_known, 3) if tally.part_known else None,
            "by_kind": by_kind}


def print_table(res: dict) -> None:
    print(f"{'kind':<10}{'count':>7}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}  statuses")
    rows = list(res["by_kind"].items()) + [("all", {"count": res["requests"], "requests_per_s": res["requests_per_s"],
                                                     "latency_ms": res["latency_ms"], "statuses": res["statuses"]})]
    for kind, k in rows:
        lat = k["latency_ms"]
        st = " ".join(f"{s}:{n}" for s, n in k["statuses"].items())
        print(f"{kind:<10}{k['count']:>7}{k['requests_per_s']:>8}{lat['p50']:>9}{lat['p95']:>9}{lat['p99']:>9}  {st}")
    srv = res["server"]
    print(f"{res['clients']} clients, {res['requests']} requests in {res['duration_s']} s: "
          f"{res['requests_per_s']} requests/s; server peak RSS {srv['peak_rss_mb']} MB "
          f"(before load {srv['rss_before_load_mb']}, after {srv['rss_after_load_mb']}); "
          f"{len(res['valid_images'])} valid images, part agreement {res['part_agreement']}")
    print(f"5xx: {res['n_5xx']}, connection errors: {sum(res['connection_errors'].values())}, "
          f"unexpected statuses: {res['unexpected_status']}, bad uploads: {res['bad_uploads']}, "
          f"server exceptions logged: {srv['exceptions_logged']}")
    print("PASS" if res["ok"] else "FAIL:\n  " + "\n  ".join(res["failures"][:20]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a trained run folder (default: train a tiny one on phantoms first)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--requests", type=int, default=2000, help="stop after this many requests (0: no limit)")
    ap.add_argument("--duration", type=float, default=120, help="stop after this many seconds (0: no limit)")
    ap.add_argument("--max-upload-mb", type=float, default=2, help="the server's upload cap (default 2)")
    ap.add_argument("--images", nargs="+", default=[], help="valid images to upload (default: the run's own)")
    ap.add_argument("--n-images", type=int, default=8, help="training images to upload when no --images (default 8)")
    ap.add_argument("--jpegs", type=int, default=2, help="of those, how many also go as JPEG (default 2)")
    ap.add_argument("--large-mp", type=float, default=16,
                    help="megapixels of the 'large' upload, under the run's pixel cap (default 16)")
    ap.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                    help=f"request kinds and weights (default {DEFAULT_MIX})")
    ap.add_argument("--fetch-results", type=float, default=0.3,
                    help="share of valid uploads followed by fetching their image and heatmap (default 0.3)")
    ap.add_argument("--server-threads", type=int, default=None,
                    help="OMP/MKL threads of the server (default: the environment's)")
    ap.add_argument("--timeout", type=float, default=120, help="per-request timeout in seconds (default 120)")
    ap.add_argument("--startup-timeout", type=float, default=180, help="seconds to wait for /health")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the tiny run and the server log here (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="no table")
    args = ap.parse_args(argv)
    if args.clients < 1 or (args.requests <= 0 and args.duration <= 0):
        ap.error("need --clients >= 1 and a --requests or --duration bound")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    env = server_env(args.server_threads)
    try:
        t0 = time.perf_counter()
        run = Path(args.run) if args.run else build_tiny_run(work, env)
        build_s = time.perf_counter() - t0
        log_path = work / "server.log"
        log_path.write_bytes(b"")
        proc, base, health = start_server(run, args.max_upload_mb, env, log_path, args.startup_timeout)
        try:
            res = load(args, run, proc, base, health, log_path)
        finally:
            stop_server(proc)
        res["settings"]["build_run_s"] = round(build_s, 1) if not args.run else None
        res["server"]["log"] = str(log_path) if args.workdir else None
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if not args.quiet:
        print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


def load(args, run: Path, proc: subprocess.Popen, base: str, health: dict, log_path: Path) -> dict:
    valid = valid_uploads(run, args.images, args.n_images, args.jpegs)
    tally = Tally()
    ctx = {"seed": args.seed, "health": health, "upload": valid, "fetch_results": args.fetch_results,
           "garbage": garbage_uploads(args.seed, valid[0].data),
           "big": PNG_MAGIC + bytes(health["max_upload_bytes"] + 64 * 1024)}
    # the baseline: each valid image alone, before any load (also warms the server up)
    ctx["baseline"] = {}
    ctx["large"] = [large_upload(args.large_mp)] if "large" in args.mix else []
    with httpx.Client(base_url=base, timeout=args.timeout) as http:
        for up in valid + ctx["large"]:
            r = http.post("/api/predict", files={"file": (up.name, up.data, up.ctype)})
            why = f"status {r.status_code}: {r.text[:200]}" if r.status_code != 200 else \
                problem_with(r.json(), up, health, None)
            if why is not None:
                tally.fail(f"baseline upload {up.name}: {why}")
                tally.bad_uploads += 1
            else:
                ctx["baseline"][up.name] = r.json()
        listing = http.get("/api/clusters", params={"per_cluster": 500}).json()
    ctx["upload"] = [up for up in valid if up.name in ctx["baseline"]] or valid
    ctx["large"] = [up for up in ctx["large"] if up.name in ctx["baseline"]] or ctx["large"]
    ctx["n_stages"] = len(listing["stages"])
    ctx["gallery"] = sorted({i for s in listing["stages"] for c in s["clusters"] for i in c["images"]})
    ctx["names"] = [(c["rename_url"], c["name"]) for s in listing["stages"] for c in s["clusters"]]

    watch = MemoryWatch(proc.pid)
    before_kb = watch.sample()[0] if watch.available else None
    fds_before = watch.open_fds() if watch.available else None
    watch.start()
    budget = Budget(args.requests, args.duration, args.mix, args.seed)
    barrier = threading.Barrier(args.clients + 1)
    clients = [Client(i, base, budget, tally, ctx, barrier, args.timeout) for i in range(args.clients)]
    for c in clients:
        c.start()
    barrier.wait()
    budget.start()
    t0 = time.perf_counter()
    for c in clients:
        c.join()
    seconds = time.perf_counter() - t0
    alive = proc.poll() is None
    after_kb = watch.sample()[0] if watch.available and alive else None
    fds_after = watch.open_fds() if watch.available and alive else None
    watch.stop.set()
    watch.join()
    if alive:  # the server still answers after the load
        try:
            alive = httpx.get(base + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            alive = False

    log_text = log_path.read_text(errors="replace")
    exceptions = log_text.count("Traceback (most recent call last)")
    res = {"ok": False, "failures": list(tally.failures), "clients": args.clients, **summarise(tally, seconds)}
    res["valid_images"] = [up.name for up in valid]
    res["server"] = {"pid": proc.pid, "peak_rss_mb": mb(watch.peak_rss_kb), "rss_before_load_mb": mb(before_kb),
                     "rss_after_load_mb": mb(after_kb), "open_fds_before_load": fds_before,
                     "open_fds_after_load": fds_after, "alive_after_load": alive,
                     "exceptions_logged": exceptions}
    res["settings"] = {"run": str(run) if args.run else "tiny phantom run (42 images, 32 px)",
                       "requests_limit": args.requests, "duration_limit_s": args.duration,
                       "max_upload_mb": args.max_upload_mb, "large_mp": args.large_mp, "mix": args.mix,
                       "fetch_results": args.fetch_results,
                       "server_threads": args.server_threads, "seed": args.seed}
    res["machine"] = {"cpus": os.cpu_count(),
                      "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if res["n_5xx"]:
        res["failures"].insert(0, f"{res['n_5xx']} responses were 5xx")
    if not alive:
        res["failures"].insert(0, f"the server died or stopped answering; log:\n{tail(log_path)}")
    if exceptions:
        res["failures"].insert(0, f"the server logged {exceptions} tracebacks; log:\n{tail(log_path)}")
    res["ok"] = (not res["n_5xx"] and not res["connection_errors"] and not res["bad_uploads"]
                 and not res["unexpected_status"] and alive and not exceptions and not res["failures"])
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

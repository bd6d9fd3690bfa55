"""A real Orthanc PACS on loopback for the DICOMweb tests, and a fault-injecting proxy before it.

:func:`start_orthanc` runs Debian's ``Orthanc`` (packages ``orthanc`` and ``orthanc-dicomweb``;
``.ci/run`` installs them) on a free loopback port with a temporary storage folder and DICOMweb
switched on; :func:`orthanc_or_skip` skips a test, saying why, where it cannot run.
:class:`FaultProxy` forwards HTTP to it and, where its ``fault`` callback says so, answers a
request with a fault instead: an HTTP error, a truncated body, a non-DICOM payload, silence
until the client times out, or a dropped connection.
"""

from __future__ import annotations

import http.client
import io
import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

PLUGINS = (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
           Path("/usr/lib/orthanc/plugins/libOrthancDicomWeb.so"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_or_skip() -> tuple[str, Path]:
    """The Orthanc binary and its DICOMweb plugin, or a skip that says what is missing."""
    binary = shutil.which("Orthanc")
    plugin = next((p for p in PLUGINS if p.is_file()), None)
    if binary is None or plugin is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
                    ".ci/run does it)")
    return binary, plugin


@dataclass
class Orthanc:
    """A running Orthanc: ``url`` is its REST root, ``dicomweb`` its DICOMweb root."""

    process: subprocess.Popen
    port: int
    folder: Path
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, dicom_bytes: bytes) -> None:
        """Store one DICOM file through Orthanc's REST API."""
        _request("POST", self.port, "/instances", dicom_bytes)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orthanc(folder: Path, port: int | None = None, tries: int = 3) -> Orthanc:
    """Start Orthanc with its storage in ``folder`` (kept when it restarts on the same folder);
    waits until it answers, at most 30 s. A free port can be taken by another process before
    Orthanc binds it, so a start that fails is tried again on a new port."""
    for attempt in range(tries):
        try:
            return _start_orthanc(folder, port if attempt == 0 else None)
        except RuntimeError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _start_orthanc(folder: Path, port: int | None) -> Orthanc:
    binary, plugin = orthanc_or_skip()
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = folder / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bonecluster-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": port, "DicomServerEnabled": False, "DicomPort": free_port(),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }))
    log = open(folder / "orthanc.log", "ab")
    process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(process, port, folder, config)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}; see {folder / 'orthanc.log'}")
        try:
            _request("GET", port, "/system")
            return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer on port {port} within 30 s; see {folder / 'orthanc.log'}")


def _request(method: str, port: int, path: str, body: bytes | None = None) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/dicom"} if body else {})
        response = conn.getresponse()
        data = response.read()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status} {data[:200]!r}")
        return data
    finally:
        conn.close()


def phantom_dicoms(n_studies: int, parts=("HAND", "ELBOW", "HUMERUS"), views: int = 2, size: int = 64,
                   seed: int = 0) -> list[bytes]:
    """``n_studies`` studies of ``views`` phantom films each, as DICOM files with patient, study,
    series and BodyPartExamined tags (parts in turn)."""
    from pydicom import dcmwrite
    from pydicom.uid import generate_uid

    from bonecluster.data.phantoms import render_phantom
    from tests.unit.dicom_utils import dicom_dataset

    rng = np.random.default_rng(seed)
    files = []
    for s in range(n_studies):
        part, study, series = parts[s % len(parts)], generate_uid(), generate_uid()
        for _ in range(views):
            pixels = render_phantom(part, None, rng, size).astype(np.uint16) * 200
            ds = dicom_dataset(pixels, PatientID=f"patient{s // 2:03d}", StudyInstanceUID=study,
                               SeriesInstanceUID=series, BodyPartExamined=part, StudyDate="20250101")
            buf = io.BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
            files.append(buf.getvalue())
    return files


# A fault for one request: None (forward it), an HTTP status (answer with it), "truncate" (send the
# first half of the real body, then close), "garbage" (a multipart body whose part is not DICOM),
# "cut-multipart" (the first half of a multipart body, sent with that half's length: complete at
# the HTTP level, cut inside the multipart), "hang" (say nothing until the client gives up), "drop"
# (close the connection without a word).
Fault = Callable[[str, str, int], "int | str | None"]


class FaultProxy:
    """An HTTP proxy on loopback before ``target_port``; ``fault(method, path, n)`` (``n``: the
    request's number, from 1) decides what each request meets. ``requests`` counts them."""

    def __init__(self, target_port: int, fault: Fault):
        self.target_port, self.fault, self.requests = target_port, fault, 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests += 1
            n = self.requests
        what = self.fault(h.command, h.path, n)
        if what == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if what == "hang":
            self._release.wait(timeout=60)
            h.close_connection = True
            return
        if isinstance(what, int):
            body = b"injected fault"
            h.send_response(what)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        length = int(h.headers.get("Content-Length") or 0)
        upstream = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=30)
        headers = {k: v for k, v in h.headers.items()          # plain bodies, so faults can cut them
                   if k.lower() not in ("host", "connection", "accept-encoding")}
        try:
            upstream.request(h.command, h.path, body=h.rfile.read(length) if length else None, headers=headers)
            reply = upstream.getresponse()
            body = reply.read()
        except OSError:   # the server behind is gone: so is the answer
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        finally:
            upstream.close()
        content_type = reply.getheader("Content-Type", "")
        if what == "garbage" and "multipart" in content_type:
            boundary = content_type.split("boundary=")[-1].strip('"; ')
            body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"this is not DICOM"
                    + f"\r\n--{boundary}--\r\n".encode())
        if what == "cut-multipart":
            body = body[: len(body) // 2]
        h.send_response(reply.status)
        for key in ("Content-Type",):
            if reply.getheader(key):
                h.send_header(key, reply.getheader(key))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if what == "truncate":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(body)

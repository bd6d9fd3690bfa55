"""A PACS as a data source: studies searched with QIDO-RS, instances fetched with WADO-RS.

A source written ``dicomweb+http://HOST:PORT/dicom-web`` (or ``dicomweb+https://``), with
optional QIDO-RS study filters as its query (``?ModalitiesInStudy=DX&StudyDate=20250101-20251231``),
stands wherever a folder does (``bonecluster prepare | train | predict | evaluate``). It is read
in two steps (DICOM PS3.18, the DICOMweb standard; the HTTP side is ``dicomweb-client``):

1. QIDO-RS searches the studies that match the filters, then each study's instances, page by page.
2. WADO-RS fetches every instance not already fetched, as a DICOM file, into a mirror folder
   inside the run's cache: ``CACHE/dicomweb/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``. DICOM UIDs are
   unique worldwide, so the same instance is not fetched again when the server's address changes.
   Each file is written atomically, so a run that stops (a kill, a server gone) keeps every
   file it finished, and the next run fetches only the rest. A bounded pool of threads fetches
   in parallel, with a progress bar.

The folder reader then reads the mirrored files as it reads a PACS export (patient, study and
BodyPartExamined from the DICOM headers), and the decode-once cache decodes them.

Faults: a timeout, a dropped connection, an answer cut short or a 408 / 429 / 5xx answer is retried with exponential
backoff (``attempts`` tries in all); an instance that still fails, a payload that is not DICOM,
an instance over the pixel cap or the frame limit (from the search's Rows, Columns and frames,
before any download) or a UID
that is not a UID is skipped and reported like a bad file, and the run goes on. After
``give_up_after`` instances in a row fail to connect, the server is taken for gone and the rest
are skipped at once rather than each waiting out its retries. A search that fails outright makes
the whole source unusable (:class:`DicomWebError`).

Credentials come from the environment, never from the source string, so they are not written to
a run folder, a config or a log: ``BONECLUSTER_DICOMWEB_TOKEN`` (sent as a bearer token), or
``BONECLUSTER_DICOMWEB_USER`` and ``BONECLUSTER_DICOMWEB_PASSWORD`` (basic auth).
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import parse_qsl, urlsplit

from bonecluster.data.records import SkipLog
from bonecluster.io import atomic_write_bytes

log = logging.getLogger("bonecluster")

PREFIX = "dicomweb+"
TOKEN_ENV = "BONECLUSTER_DICOMWEB_TOKEN"
USER_ENV = "BONECLUSTER_DICOMWEB_USER"
PASSWORD_ENV = "BONECLUSTER_DICOMWEB_PASSWORD"
MIRROR = "dicomweb"   # the mirror folder's name inside a cache

# DICOM JSON tags (PS3.18 F.2) read from the search results.
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_ROWS, _COLUMNS, _FRAMES = "00280010", "00280011", "00280008"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")   # PS3.5 9.1: digits and dots, at most 64 characters (fullmatch)
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SOP_CLASS = "00080016"
# SOP classes that hold no image (PS3.4 B.5): structured reports (bonecluster's own among them),
# presentation states, encapsulated documents. A study's instances of these are not fetched.
_NOT_IMAGES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.104.")


class DicomWebError(Exception):
    """The DICOMweb source as a whole is unusable (bad address, no server, a failed search)."""


def is_dicomweb(source) -> bool:
    """Whether ``source`` names a DICOMweb server (``dicomweb+http://...``) rather than a path."""
    return str(source).lower().startswith((PREFIX + "http://", PREFIX + "https://"))


@dataclass(frozen=True)
class DicomWebSource:
    """A parsed ``dicomweb+`` source: the service's base URL and the QIDO-RS study filters."""

    url: str                                   # http(s)://host[:port]/path, no query
    filters: tuple[tuple[str, str], ...] = ()  # (attribute, value), as given

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.filters)
        return PREFIX + self.url + (f"?{query}" if query else "")


def parse_source(source: str) -> DicomWebSource:
    """Parse ``dicomweb+http(s)://HOST[:PORT]/PATH[?Attr=value&...]``; raises DicomWebError."""
    text = str(source)
    if not is_dicomweb(text):
        raise DicomWebError(f"{text}: not a DICOMweb source (expected dicomweb+http://HOST:PORT/PATH)")
    parts = urlsplit(text[len(PREFIX):])
    if parts.username is not None or parts.password is not None:
        raise DicomWebError(f"{_redact(text)}: credentials do not go in the address; set {TOKEN_ENV}, "
                            f"or {USER_ENV} and {PASSWORD_ENV}")
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if not parts.hostname or not port_ok:
        raise DicomWebError(f"{text}: no valid host and port in the address")
    if parts.fragment:
        raise DicomWebError(f"{text}: an address with a #fragment is not a DICOMweb service")
    try:
        filters = tuple(parse_qsl(parts.query, strict_parsing=True)) if parts.query else ()
    except ValueError as err:
        raise DicomWebError(f"{text}: the filters are not Attribute=value pairs joined by '&' ({err})") from err
    url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return DicomWebSource(url, filters)


def _redact(text: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", text)


def session_from_env(env: Mapping[str, str] | None = None):
    """A ``requests`` session with the credentials of the environment (see the module's docstring)."""
    import requests

    env = os.environ if env is None else env
    session = requests.Session()
    token, user, password = env.get(TOKEN_ENV), env.get(USER_ENV), env.get(PASSWORD_ENV)
    for name, value in ((TOKEN_ENV, token), (USER_ENV, user), (PASSWORD_ENV, password)):
        if value and (value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value)):
            # requests would refuse the header and quote it, secret included, in its error
            raise DicomWebError(f"{name} has white space or a control character at an end or inside; "
                                "set it to the bare value")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user or password:
        if not (user and password):
            raise DicomWebError(f"basic auth needs both {USER_ENV} and {PASSWORD_ENV}")
        session.auth = (user, password)
    return session


@dataclass(frozen=True)
class FetchOptions:
    """How a DICOMweb source is fetched. ``mirror``: the folder the instances go to (a run's
    ``cache/dicomweb``); ``pixel_cap``, ``max_frames``: instances whose Rows x Columns or number of
    frames exceed them, by the search's own figures, are skipped before download (the cache's
    limits, ``data.pixel_cap`` and ``data.max_frames``, which the cache checks again on the file)."""

    mirror: Path
    workers: int = 4
    attempts: int = 3          # tries per request, the first included
    backoff: float = 0.5       # seconds before the second try; doubled before each next one
    timeout: float = 30.0      # seconds to connect, and between bytes of an answer
    give_up_after: int = 8     # instances in a row that cannot reach the server: it is gone
    page: int = 500            # search results asked for per request
    pixel_cap: int = 64_000_000
    max_frames: int = 16
    progress: bool = True


@dataclass
class FetchStats:
    """What one fetch did; ``seconds`` is the whole fetch, searches included."""

    studies: int = 0
    instances: int = 0
    downloaded: int = 0
    reused: int = 0
    skipped: int = 0
    not_images: int = 0      # reports, presentation states, documents: left on the server
    bytes: int = 0
    seconds: float = 0.0

    @property
    def instances_per_second(self) -> float:
        return self.downloaded / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Instance:
    study: str
    series: str
    sop: str

    @property
    def label(self) -> str:
        return f"{self.study}/{self.series}/{self.sop}"


def fetch(source: str | DicomWebSource, options: FetchOptions, skips: SkipLog,
          client_factory: Callable | None = None) -> tuple[list[Path], FetchStats]:
    """Search ``source`` and bring every matching instance into ``options.mirror``; returns the
    mirrored files of this search, sorted, and what was done. Skipped instances go to ``skips``
    (named ``SOURCE#STUDY/SERIES/SOP``). ``client_factory(url, session, timeout)`` makes the
    DICOMweb client (tests inject faults there); the default is ``dicomweb_client.DICOMwebClient``.
    Raises DicomWebError when the server cannot be searched at all."""
    src = source if isinstance(source, DicomWebSource) else parse_source(source)
    if options.workers < 1 or options.attempts < 1:
        raise ValueError(f"workers and attempts must be >= 1, got {options.workers} and {options.attempts}")
    started = time.perf_counter()
    client = _client(src, options, client_factory)
    stats = FetchStats()
    try:
        studies = _search(lambda **page: client.search_for_studies(search_filters=dict(src.filters), **page),
                          options, _STUDY_UID)
    except Exception as err:  # noqa: BLE001 - whatever the transport raised, named for the user
        raise DicomWebError(f"{src}: cannot search studies: {_reason(err)}") from err
    stats.studies = len(studies)
    instances = []
    for study in studies:
        uid = _first(study, _STUDY_UID)
        if not _is_uid(uid):
            _skip(skips, stats, src, _shown(uid), "the search returned a study without a valid StudyInstanceUID")
            continue
        try:   # one study that cannot be searched (gone since, a 5xx) is skipped, not the source
            found = _search(lambda **page: client.search_for_instances(
                study_instance_uid=uid, fields=[_SERIES_UID, _SOP_CLASS, _ROWS, _COLUMNS, _FRAMES], **page),
                options, _SOP_UID)
        except Exception as err:  # noqa: BLE001
            _skip(skips, stats, src, uid, f"cannot search the study's instances: {_reason(err)}")
            continue
        instances += _instances(uid, found, src, skips, stats, options)
    stats.instances = len(instances)
    paths = _bring_all(client, instances, Path(options.mirror), src, options, skips, stats)
    stats.seconds = time.perf_counter() - started
    log.info("DICOMweb %s: %d studies, %d instances (%d fetched, %d already here, %d skipped; %d that are not "
             "images left on the server) in %.1f s", src, stats.studies, stats.instances, stats.downloaded,
             stats.reused, stats.skipped, stats.not_images, stats.seconds)
    return sorted(paths), stats


def _client(src: DicomWebSource, options: FetchOptions, factory: Callable | None):
    session = session_from_env()
    if factory is None:
        try:
            from dicomweb_client import DICOMwebClient
        except ImportError as err:
            raise DicomWebError("DICOMweb sources need dicomweb-client: pip install 'bonecluster[pacs]'") from err
        factory = DICOMwebClient
    # Their own loggers would print a line per instance and a traceback per failed try; the
    # skips and the summary below say what the user needs.
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    logging.getLogger("retrying").setLevel(logging.ERROR)
    client = factory(url=src.url, session=session, timeout=options.timeout)
    client.set_http_retry_params(retry=False)   # ours below: bounded, and for dropped connections too
    return client


def _search(call: Callable, options: FetchOptions, key: str) -> list[dict]:
    """Every result of a QIDO-RS search, ``options.page`` at a time, retried like a download, until
    an empty page (a server may cap its pages below what was asked). A server that ignores the
    limit (a page larger than asked) or the offset (a page with no new ``key`` UID) has sent all
    it will. Items that are not JSON objects are dropped."""
    results: list[dict] = []
    seen: set = set()
    while True:
        page = _retried(lambda: call(limit=options.page, offset=len(results)), options) or []
        items = [item for item in page if isinstance(item, dict)]
        new = [item for item in items if _first(item, key) not in seen]
        seen.update(_first(item, key) for item in new)
        results += new
        if not new or len(page) > options.page:
            return results


def _instances(study: str, found: list[dict], src, skips: SkipLog, stats: FetchStats,
               options: FetchOptions) -> list[_Instance]:
    """The study's image instances to fetch; the rest are counted (not images) or skipped (bad
    UIDs; over the pixel cap or the frame limit by the search's own Rows, Columns and frames)."""
    out = []
    for item in found:
        if str(_first(item, _SOP_CLASS) or "").startswith(_NOT_IMAGES):
            stats.not_images += 1
            continue
        series, sop = _first(item, _SERIES_UID), _first(item, _SOP_UID)
        if not (_is_uid(series) and _is_uid(sop)):
            _skip(skips, stats, src, f"{study}/{_shown(series)}/{_shown(sop)}",
                  "the search returned an instance without valid UIDs")
            continue
        inst = _Instance(study, series, sop)
        rows, cols, frames = (_count(_first(item, tag)) for tag in (_ROWS, _COLUMNS, _FRAMES))
        if rows and cols and rows * cols > options.pixel_cap:
            _skip(skips, stats, src, inst.label, f"{rows} x {cols} = {rows * cols:,} pixels, over the pixel cap "
                  f"of {options.pixel_cap:,} (--max-pixels); not downloaded")
        elif frames and frames > options.max_frames:
            _skip(skips, stats, src, inst.label, f"{frames} frames, over the limit of {options.max_frames} "
                  "(--max-frames); not downloaded")
        else:
            out.append(inst)
    return out


def _count(value) -> int | None:
    """A positive whole number from a search result (Rows, Columns, NumberOfFrames), else None."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _shown(value) -> str:
    """A value from the server, safe to print in one line of a report."""
    return repr(value)[:80] if not isinstance(value, str) or not value.isprintable() else value[:80]


def _bring_all(client, instances: list[_Instance], folder: Path, src, options: FetchOptions,
               skips: SkipLog, stats: FetchStats) -> list[Path]:
    """Fetch what is not mirrored yet, ``options.workers`` at a time; returns the mirrored paths."""
    from tqdm.auto import tqdm

    paths, todo = [], []
    for inst in instances:
        path = folder / inst.study / inst.series / f"{inst.sop}.dcm"
        if path.is_file():
            paths.append(path)
            stats.reused += 1
        else:
            todo.append((inst, path))
    gone = _Gone(options.give_up_after)
    lock = threading.Lock()

    def bring(job) -> None:
        inst, path = job
        reason = "the server was unreachable for the instances before it; not tried" if gone.yes else None
        if reason is None:
            try:
                size = _bring(client, inst, path, options)
                gone.reached()
            except _Unreachable as err:
                gone.missed()
                reason = str(err)
            except Exception as err:  # noqa: BLE001 - one bad instance is skipped, not fatal
                gone.reached()
                reason = _reason(err)
        with lock:
            if reason is None:
                paths.append(path)
                stats.downloaded += 1
                stats.bytes += size
            else:
                _skip(skips, stats, src, inst.label, reason)
            bar.update(1)

    with tqdm(total=len(todo), desc="DICOMweb", unit="inst", disable=not options.progress or not todo,
              dynamic_ncols=True) as bar:
        pool = ThreadPoolExecutor(max_workers=options.workers)
        try:
            for future in [pool.submit(bring, job) for job in todo]:
                future.result()
        except BaseException:   # Ctrl-C: drop the queued fetches; finished files stay
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return paths


class _Unreachable(Exception):
    """Every try of a request failed to reach the server (refused, reset, timed out)."""


class _Gone:
    """Counts instances in a row that could not reach the server."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self._lock = limit, 0, threading.Lock()

    @property
    def yes(self) -> bool:
        return self.in_a_row >= self.limit

    def missed(self) -> None:
        with self._lock:
            self.in_a_row += 1

    def reached(self) -> None:
        with self._lock:
            self.in_a_row = 0


def _bring(client, inst: _Instance, path: Path, options: FetchOptions) -> int:
    """WADO-RS one instance and write it to ``path`` atomically; returns its size in bytes."""
    from pydicom import dcmwrite

    ds = _retried(lambda: _whole(client.retrieve_instance(inst.study, inst.series, inst.sop)), options)
    if str(getattr(ds, "SOPInstanceUID", "")) != inst.sop:
        raise ValueError(f"the server sent instance {getattr(ds, 'SOPInstanceUID', None)!r} instead")
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue())
    return buf.tell()


class _CutShort(Exception):
    """The instance arrived, but its pixel data stops before its own header says it ends."""


def _whole(ds):
    """``ds``, after checking that its pixel data is all there: a multipart answer cut inside its
    HTTP length still parses, and a cut file kept in the mirror would never be fetched again."""
    if "PixelData" not in ds:   # only image instances are fetched: no pixels means cut before them
        raise _CutShort("the instance arrived without pixel data (cut short, or not an image)")
    data = ds.PixelData
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
        need = (int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1)) * frames * bits + 7) // 8
        if len(data) < need:
            raise _CutShort(f"the instance arrived cut short ({len(data):,} of {need:,} bytes of pixel data)")
        return ds
    from pydicom.encaps import generate_fragments

    try:
        for _ in generate_fragments(data):
            pass
    except Exception as err:  # noqa: BLE001 - pydicom says why in its own words
        raise _CutShort(f"the instance arrived cut short (its compressed pixel data: {err})") from err
    return ds


def _retried(call: Callable, options: FetchOptions):
    """``call()``, tried ``options.attempts`` times with exponential backoff on a dropped or timed
    out connection and on 408 / 429 / 5xx; other errors (4xx, a payload that is not DICOM) at once."""
    import requests

    unreachable = True
    for attempt in range(options.attempts):
        if attempt:
            time.sleep(options.backoff * 2 ** (attempt - 1))
        try:
            return call()
        except requests.exceptions.SSLError:
            raise    # trying again will not fix a certificate
        except (requests.ConnectionError, requests.Timeout) as err:
            last = err
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError,
                _CutShort) as err:
            last, unreachable = err, False    # the server answered, but the answer was cut short
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else None
            if status not in _RETRY_STATUS:
                raise
            last, unreachable = err, False
    if unreachable:
        raise _Unreachable(f"{_reason(last)} ({options.attempts} tries)") from last
    raise last


def _scrub(text: str) -> str:
    """``text`` without the credentials of the environment, should a library have quoted them."""
    for name in (TOKEN_ENV, USER_ENV, PASSWORD_ENV):
        secret = os.environ.get(name)
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return _redact(text)


def _reason(err: BaseException) -> str:
    """A short, credential-free reason for a skipped instance or a failed search."""
    import requests

    if isinstance(err, _Unreachable):
        return str(err)
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason or ''}".strip()
    if isinstance(err, requests.exceptions.SSLError):
        return "TLS error (certificate or protocol); check the https address and the server's certificate"
    if isinstance(err, requests.Timeout):
        return "timed out"
    if isinstance(err, requests.ConnectionError):
        return "cannot connect to the server (refused, reset or gone)"
    if isinstance(err, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return "the answer was cut short"
    if isinstance(err, _CutShort):
        return str(err)
    name = type(err).__name__
    if "InvalidDicom" in name or "multipart" in str(err).lower():
        return f"not a DICOM payload ({_scrub(str(err))[:200]})"
    return f"{name}: {_scrub(str(err))[:200]}"


def _skip(skips: SkipLog, stats: FetchStats, src: DicomWebSource, what: str, reason: str) -> None:
    skips.add(f"{src}#{what}", reason)
    stats.skipped += 1


def _first(item, tag: str):
    """The first value of ``tag`` in a DICOM JSON object (PS3.18 F.2), or None for anything else."""
    entry = item.get(tag) if isinstance(item, dict) else None
    values = entry.get("Value") if isinstance(entry, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _is_uid(value) -> bool:
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def store(source: str | DicomWebSource, datasets, options: FetchOptions,
          client_factory: Callable | None = None) -> list[str | None]:
    """STOW-RS each dataset to ``source``'s server (one request each, one client, retried like a
    fetch); returns, per dataset, None when the server stored it, else the reason it did not.
    After ``options.give_up_after`` datasets in a row that cannot reach the server, the rest are
    not tried. Raises DicomWebError only for a bad address or a missing dicomweb-client."""
    src = source if isinstance(source, DicomWebSource) else parse_source(source)
    client = _client(src, options, client_factory)
    gone = _Gone(options.give_up_after)
    outcomes: list[str | None] = []
    for ds in datasets:
        if gone.yes:
            outcomes.append("the server was unreachable for the reports before it; not tried")
            continue
        try:
            answer = _retried(lambda: client.store_instances(datasets=[ds]), options)
            gone.reached()
            failed = getattr(answer, "FailedSOPSequence", None) if answer is not None else None
            outcomes.append(f"the server refused it (FailureReason {failed[0].get('FailureReason', '?')})"
                            if failed else None)
        except _Unreachable as err:
            gone.missed()
            outcomes.append(str(err))
        except Exception as err:  # noqa: BLE001 - reported per report; the others are still stored
            gone.reached()
            outcomes.append(_reason(err))
    return outcomes

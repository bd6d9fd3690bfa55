"""Decode-once cache: every image decoded a single time into a memory-mapped uint8 store.

Layout of a cache folder (one store per preprocessing setting, so sizes can share a folder)::

    CACHE/
      <Preprocess.key()>/
        meta.json      size and preprocessing settings (written once, atomically)
        pixels.u8      append-only rows of size*size uint8 (one row per decoded image)
        index.jsonl    append-only, one line per decoded (or skipped) file:
                       {"path", "mtime_ns", "bytes", "row"} or {..., "row": -1, "reason"}
        .lock          taken while a prepare writes, so two writers never interleave
      dataset.json     the last prepared view: records, their rows, skipped files

An index entry is valid only while the file's path, mtime and byte size match, so a changed
file is decoded again (its new row is appended; the old one is simply no longer referenced).

Crash safety: a batch of pixel rows is written and flushed *before* its index lines, so an
index line never points at pixels that were not written. On open, a torn last index line and
pixel bytes past the last indexed row are cut off; a killed ``prepare`` therefore resumes
where it stopped and ends with the same bytes a clean run writes. A write that fails (full
disk, file-size limit, read-only folder) is rolled back to the last complete batch and raised as
:class:`bonecluster.io.WriteError` naming the file. A cache that is complete can be read from a
read-only folder (the lock is then taken shared on the existing ``.lock``).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from bonecluster.data.decode import Limits, Preprocess, load_image
from bonecluster.data.records import Record, SkipError, Skipped, SkipLog
from bonecluster.io import WriteError, atomic_write_text, remove_stale_temps

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileKey:
    """What identifies one decoded file: its resolved path, mtime and byte size."""

    path: str
    mtime_ns: int
    bytes: int

    @classmethod
    def of(cls, path: str | Path) -> "FileKey":
        st = os.stat(path)
        return cls(os.path.realpath(path), st.st_mtime_ns, st.st_size)


class PixelStore:
    """The memory-mapped rows of one preprocessing setting, plus their index.

    ``rows()`` returns a read-only ``np.memmap`` of shape (n_rows, size, size), uint8.
    """

    def __init__(self, folder: str | Path, pre: Preprocess):
        self.folder = Path(folder)
        self.pre = pre
        self.row_bytes = pre.size * pre.size
        self.pixels_path = self.folder / "pixels.u8"
        self.index_path = self.folder / "index.jsonl"
        self.entries: dict[str, dict] = {}
        self.n_rows = 0

    # -- opening and repair ---------------------------------------------------------------

    def open(self) -> "PixelStore":
        _mkdir(self.folder)
        remove_stale_temps(self.folder)  # e.g. a meta.json temp of a killed first prepare
        self._check_or_write_meta()
        self._load_index_and_repair()
        return self

    def _check_or_write_meta(self) -> None:
        meta_path = self.folder / "meta.json"
        meta = {"format": FORMAT_VERSION, "preprocess": asdict(self.pre)}
        if meta_path.exists():
            found = json.loads(meta_path.read_text())
            if found != meta:
                raise RuntimeError(f"{meta_path}: cache settings differ from {meta}; "
                                   "use another cache folder or delete this one")
        else:
            atomic_write_text(meta_path, json.dumps(meta, indent=2))

    def _load_index_and_repair(self) -> None:
        """Read the index, drop a torn tail, and cut pixels past the last indexed row."""
        entries, good_bytes, n_rows = _read_index(self.index_path)
        if self.index_path.exists() and good_bytes < self.index_path.stat().st_size:
            _truncate(self.index_path, good_bytes)
        pixel_bytes = self.pixels_path.stat().st_size if self.pixels_path.exists() else 0
        if pixel_bytes < n_rows * self.row_bytes:
            raise RuntimeError(f"{self.pixels_path}: shorter than its index says; delete the cache folder")
        if pixel_bytes > n_rows * self.row_bytes:
            _truncate(self.pixels_path, n_rows * self.row_bytes)
        self.entries, self.n_rows = entries, n_rows

    # -- lookups and appends --------------------------------------------------------------

    def lookup(self, key: FileKey, limits: Limits | None = None) -> dict | None:
        """The index entry for this exact file version, or None when it must be decoded.

        A skip is reused only if it was recorded under the same ``limits``: raising a limit
        (say ``--max-pixels``) retries the files that the old one refused.
        """
        entry = self.entries.get(key.path)
        if not entry or entry["mtime_ns"] != key.mtime_ns or entry["bytes"] != key.bytes:
            return None
        if entry["row"] < 0 and limits is not None and entry.get("limits") != asdict(limits):
            return None
        return entry

    def append(self, results: Sequence[tuple[FileKey, np.ndarray | str]], limits: Limits | None = None) -> None:
        """Append decoded images (uint8 (S, S)) or skip reasons, pixels first, then index.

        On a write error both files are cut back to the previous batch (what a reopen would do)
        and WriteError names the file; the store then holds only complete entries.
        """
        lines, entries, n_rows = [], {}, self.n_rows
        index_bytes = self.index_path.stat().st_size if self.index_path.exists() else 0
        path = self.pixels_path
        try:
            with open(self.pixels_path, "ab") as pix:
                for key, result in results:
                    entry = asdict(key)
                    if isinstance(result, str):
                        entry.update(row=-1, reason=result)
                        if limits is not None:
                            entry["limits"] = asdict(limits)
                    else:
                        pix.write(np.ascontiguousarray(result, dtype=np.uint8).tobytes())
                        entry["row"] = n_rows
                        n_rows += 1
                    entries[key.path] = entry
                    lines.append(json.dumps(entry) + "\n")
                pix.flush()
            path = self.index_path
            with open(self.index_path, "a", encoding="utf-8") as idx:
                idx.write("".join(lines))
                idx.flush()
        except OSError as err:
            for done, size in ((self.index_path, index_bytes), (self.pixels_path, self.n_rows * self.row_bytes)):
                try:
                    if done.exists() and done.stat().st_size > size:
                        os.truncate(done, size)
                except OSError:
                    pass  # the next open cuts the tail instead
            raise WriteError.of(path, err) from err
        self.entries.update(entries)
        self.n_rows = n_rows

    def rows(self) -> np.ndarray:
        if self.n_rows == 0:
            return np.zeros((0, self.pre.size, self.pre.size), np.uint8)
        return np.memmap(self.pixels_path, np.uint8, "r", shape=(self.n_rows, self.pre.size, self.pre.size))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time per store (a second prepare waits).

        In a folder this process cannot write, an existing lock is taken shared: reading a
        complete cache works, and a write that is then needed fails with WriteError.
        """
        _mkdir(self.folder)
        lock_path = self.folder / ".lock"
        try:
            lock, how = open(lock_path, "a"), fcntl.LOCK_EX
        except OSError as err:
            if not lock_path.exists():
                raise WriteError.of(lock_path, err) from err
            lock, how = open(lock_path, "r"), fcntl.LOCK_SH
        with lock:
            fcntl.flock(lock, how)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _read_index(path: Path) -> tuple[dict[str, dict], int, int]:
    """The newest entry of each file in an index (by path), the bytes of its complete lines and the
    rows they reach (every line counts, superseded ones too); reading stops at a line torn by a kill
    mid-write. Reads only (the lock is the caller's)."""
    entries, good_bytes, n_rows = {}, 0, 0
    if path.exists():
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    entry = json.loads(line)
                except ValueError:
                    break
                good_bytes += len(line)
                entries[entry["path"]] = entry
                n_rows = max(n_rows, entry["row"] + 1)
    return entries, good_bytes, n_rows


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError.of(err.filename or folder, err) from err


def _truncate(path: Path, size: int) -> None:
    try:
        os.truncate(path, size)
    except OSError as err:
        raise WriteError.of(f"{path} (cut to {size} bytes)", err, doing="repair") from err


# ----------------------------------------------------------------------------- prepared view


@dataclass
class PreparedDataset:
    """The records that decoded, the cache row of each, and what was skipped.

    ``images()`` returns uint8 (N, S, S) aligned with ``records``.
    """

    store_dir: Path
    pre: Preprocess
    records: list[Record]
    rows: np.ndarray  # (N,) int64 rows into the store
    skipped: SkipLog = field(default_factory=SkipLog)
    n_decoded: int = 0
    n_reused: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, positions) -> "PreparedDataset":
        """The same cache rows for a selection of records (e.g. one body part for stage 2)."""
        positions = np.asarray(positions, np.int64)
        return PreparedDataset(self.store_dir, self.pre, [self.records[i] for i in positions],
                               self.rows[positions], SkipLog())

    def abnormal(self, positions) -> np.ndarray:
        """``(len(positions),)`` bool abnormal label of those records (missing counts as False):
        for scoring only, never for training."""
        return np.array([self.records[i].abnormal for i in positions], bool)

    def images(self) -> np.ndarray:
        return _open_rows(self.store_dir, self.pre, len_hint=int(self.rows.max(initial=-1)) + 1)[self.rows]

    def pixels(self) -> np.ndarray:
        """The whole store as a read-only memmap; index it with ``rows``."""
        return _open_rows(self.store_dir, self.pre, len_hint=int(self.rows.max(initial=-1)) + 1)

    def summary(self) -> dict:
        return {"images": len(self.records), "skipped": len(self.skipped), "decoded": self.n_decoded,
                "reused": self.n_reused, "seconds": round(self.seconds, 2), "size": self.pre.size,
                "store": str(self.store_dir)}

    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION, "store": str(self.store_dir), "preprocess": asdict(self.pre),
                "records": [r.to_dict() for r in self.records], "rows": self.rows.tolist(),
                "skipped": self.skipped.to_list()}

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, json.dumps(self.to_json()))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "PreparedDataset":
        d = json.loads(Path(path).read_text())
        skipped = SkipLog([Skipped(s["path"], s["reason"]) for s in d["skipped"]])
        return cls(Path(d["store"]), Preprocess(**d["preprocess"]),
                   [Record.from_dict(r) for r in d["records"]], np.asarray(d["rows"], np.int64), skipped)


def _open_rows(store_dir: Path, pre: Preprocess, len_hint: int) -> np.ndarray:
    path = Path(store_dir) / "pixels.u8"
    n = path.stat().st_size // (pre.size * pre.size) if path.exists() else 0
    if n < len_hint:
        raise RuntimeError(f"{path}: holds {n} images but the dataset needs {len_hint}; run prepare again")
    if n == 0:
        return np.zeros((0, pre.size, pre.size), np.uint8)
    return np.memmap(path, np.uint8, "r", shape=(n, pre.size, pre.size))


# ----------------------------------------------------------------------------- prepare


def store_dir_for(cache: str | Path, pre: Preprocess) -> Path:
    return Path(cache) / pre.key()


def _decode_one(args: tuple[str, Preprocess, Limits]) -> np.ndarray | str:
    """Worker: decoded uint8 (S, S), or the skip reason as a string."""
    path, pre, limits = args
    try:
        return load_image(path, pre, limits)
    except SkipError as err:
        return str(err)


def prepare(records: Sequence[Record], cache: str | Path, pre: Preprocess = Preprocess(),
            limits: Limits = Limits(), skips: SkipLog | None = None, workers: int | None = None,
            progress: bool = True, batch: int = 64) -> PreparedDataset:
    """Decode every record once into the cache (reusing what is there) and return the view.

    Files that cannot be decoded are skipped into ``skips`` (one warning each) and the run
    goes on. Raises DataError when no image at all is usable.
    """
    from bonecluster.data.readers import DataError

    t0 = time.perf_counter()
    skips = skips if skips is not None else SkipLog()
    store = PixelStore(store_dir_for(cache, pre), pre)
    with store.locked():
        store.open()
        todo, keys = _plan(records, store, skips, limits)
        n_reused = sum(1 for k in keys if k is not None) - len(todo)
        n_decoded = _decode_into(store, todo, pre, limits, workers, progress, batch)
        kept, rows = _collect(records, keys, store, skips)
    if not kept:
        raise DataError(f"no usable image among {len(records)} file(s) ({len(skips)} skipped); "
                        "see the warnings above")
    return PreparedDataset(store.folder, pre, kept, np.asarray(rows, np.int64), skips,
                           n_decoded=n_decoded, n_reused=n_reused,
                           seconds=time.perf_counter() - t0)


def prepare_like(data: PreparedDataset, pre: Preprocess, limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = True) -> PreparedDataset:
    """``data``'s records decoded with another preprocessing ``pre`` (stage 2's size,
    ``stage2.size``) into the same cache folder, in the same order; ``data`` itself when ``pre`` is
    its own. The two views must stay aligned, film for film: raises DataError naming a file that
    was decoded for ``data`` but cannot be now, or that changed in between (another mtime or size)."""
    from bonecluster.data.readers import DataError

    if pre == data.pre:
        return data
    skips = SkipLog()
    out = prepare(data.records, Path(data.store_dir).parent, pre, limits, skips, workers=workers, progress=progress)
    if len(out) != len(data):
        lost = skips.items[0]
        raise DataError(f"{lost.path}: decoded at {data.pre.size} px but not at {pre.size} px ({lost.reason}); "
                        "the file changed since: prepare the data again")
    # the same version of each file on both sides: its newest index entry in each store, at the row used
    before = _read_index(Path(data.store_dir) / "index.jsonl")[0]
    now = _read_index(Path(out.store_dir) / "index.jsonl")[0]
    for rec, row, new_row in zip(data.records, data.rows, out.rows):
        a, b = before.get(os.path.realpath(rec.path)), now.get(os.path.realpath(rec.path))
        if a is None or b is None or (a["row"], b["row"]) != (int(row), int(new_row)) \
                or (a["mtime_ns"], a["bytes"]) != (b["mtime_ns"], b["bytes"]):
            raise DataError(f"{rec.path}: changed between its decoding at {data.pre.size} px and at {pre.size} px; "
                            "prepare the data again")
    return out


def _plan(records, store: PixelStore, skips: SkipLog, limits: Limits
          ) -> tuple[list[FileKey], list[FileKey | None]]:
    """Keys of every record (None when the file vanished) and the ones still to decode."""
    keys: list[FileKey | None] = []
    todo: dict[str, FileKey] = {}
    for rec in records:
        try:
            key = FileKey.of(rec.path)
        except OSError as err:
            keys.append(None)
            skips.add(rec.path, f"cannot read file ({err.strerror or err})")
            continue
        keys.append(key)
        if store.lookup(key, limits) is None:
            todo.setdefault(key.path, key)
    return list(todo.values()), keys


def _decode_into(store: PixelStore, todo: list[FileKey], pre: Preprocess, limits: Limits,
                 workers: int | None, progress: bool, batch: int) -> int:
    if not todo:
        return 0
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    jobs = ((k.path, pre, limits) for k in todo)
    bar = _progress(len(todo), progress, "decode")
    try:
        if workers <= 1:
            results = map(_decode_one, jobs)
            _append_in_batches(store, todo, results, batch, bar, limits)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = pool.map(_decode_one, jobs, chunksize=16)
                _append_in_batches(store, todo, results, batch, bar, limits)
    finally:
        bar.close()  # ends the bar's line, so an error message starts on its own
    return len(todo)


def _append_in_batches(store, todo, results, batch, bar, limits: Limits) -> None:
    pending = []
    for key, result in zip(todo, results):
        pending.append((key, result))
        if len(pending) >= batch:
            store.append(pending, limits)
            bar.update(len(pending))
            pending = []
    if pending:
        store.append(pending, limits)
        bar.update(len(pending))


def _collect(records, keys, store: PixelStore, skips: SkipLog) -> tuple[list[Record], list[int]]:
    kept, rows = [], []
    for rec, key in zip(records, keys):
        if key is None:
            continue
        entry = store.lookup(key)
        if entry["row"] < 0:
            skips.add(rec.path, entry["reason"])
            continue
        kept.append(rec)
        rows.append(entry["row"])
    return kept, rows


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)

"""Data layer: readers -> records -> decode-once cache (and the synthetic phantoms)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from bonecluster.data.cache import PreparedDataset, prepare, prepare_like
from bonecluster.data.readers import DataError, ReaderLimits, read_records, read_sources
from bonecluster.data.records import Record, SkipError, Skipped, SkipLog
from bonecluster.io import atomic_write_text

__all__ = ["DataError", "PreparedDataset", "Record", "SkipError", "SkipLog", "Skipped",
           "fetch_options", "prepare", "prepare_like", "prepare_sources", "read_records", "read_sources",
           "write_skipped_csv"]


def prepare_sources(sources: Sequence[str | Path], data_cfg, cache: str | Path | None = None,
                    progress: bool = True) -> PreparedDataset:
    """Read every source, then decode each image once into the cache; returns the view.

    ``data_cfg`` is a :class:`bonecluster.config.DataConfig`. Bad files are skipped and
    counted in ``.skipped``; a source with no usable image raises :class:`DataError`.
    """
    skips = SkipLog()
    cache = cache if cache is not None else data_cfg.cache
    if not cache:
        raise ValueError("no cache folder given (set data.cache or pass cache=)")
    records = read_sources(list(sources), skips, ReaderLimits(data_cfg.max_csv_row_chars),
                           fetch=fetch_options(cache, data_cfg, progress))
    if not records:
        names = ", ".join(str(s) for s in sources)
        raise DataError(f"no image found in {names} ({len(skips)} entries skipped)")
    return prepare(records, cache, data_cfg.preprocess(),
                   data_cfg.limits(), skips, workers=data_cfg.workers or None, progress=progress)


def fetch_options(cache: str | Path, data_cfg, progress: bool = True):
    """Where and how DICOMweb sources are fetched: into ``CACHE/dicomweb``, under ``data_cfg``'s
    pixel cap (:class:`bonecluster.data.dicomweb.FetchOptions`)."""
    from bonecluster.data.dicomweb import MIRROR, FetchOptions

    return FetchOptions(mirror=Path(cache) / MIRROR, pixel_cap=data_cfg.pixel_cap, max_frames=data_cfg.max_frames,
                        progress=progress)


def write_skipped_csv(path: str | Path, skips: SkipLog) -> Path:
    """``path,reason`` rows, written atomically (an empty list still writes the header)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "reason"])
    for item in skips.items:
        writer.writerow([item.path, item.reason])
    return atomic_write_text(path, buf.getvalue())

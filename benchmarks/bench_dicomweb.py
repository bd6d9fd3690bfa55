"""How fast a PACS is read over DICOMweb, against a folder of the same files (issue 26).

    python benchmarks/bench_dicomweb.py [--studies 150] [--size 512] [--workers 4] [--json OUT]

Starts Debian's Orthanc with its DICOMweb plugin on loopback (the test suite's launcher,
``tests/integration/orthanc.py``), uploads ``--studies`` studies of two phantom films each as
16-bit DICOM, writes the same files into a folder, and then times, each into a fresh cache:

* ``prepare`` of the folder (read the headers, decode, fill the cache);
* ``prepare`` of the DICOMweb source (search, fetch into the cache, then the same);
* the fetch alone, and a second DICOMweb ``prepare`` into the same cache (every instance is
  already there: the resume path).

Prints instances per second for each and the ratio of the DICOMweb prepare to the folder's.
Loopback only: a hospital network adds its own latency, which ``--workers`` overlaps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the tests' Orthanc launcher

from bonecluster.config import load_config  # noqa: E402
from bonecluster.data import SkipLog, prepare_sources  # noqa: E402
from bonecluster.data.dicomweb import FetchOptions, fetch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=150)
    ap.add_argument("--size", type=int, default=512, help="the phantom films' long side in pixels")
    ap.add_argument("--workers", type=int, default=4,
                    help="parallel WADO-RS requests of the fetch-only figure (prepare uses its default, 4)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    from tests.integration.orthanc import phantom_dicoms, start_orthanc

    cfg = load_config("cpu")
    with tempfile.TemporaryDirectory(prefix="bench-dicomweb-") as tmp:
        tmp = Path(tmp)
        files = phantom_dicoms(args.studies, size=args.size)
        folder = tmp / "folder"
        folder.mkdir()
        for i, data in enumerate(files):
            (folder / f"{i:05d}.dcm").write_bytes(data)
        server = start_orthanc(tmp / "orthanc")
        try:
            for data in files:
                server.upload(data)
            source = f"dicomweb+{server.dicomweb}"
            figures = {"instances": len(files), "size": args.size, "workers": args.workers,
                       "megabytes": round(sum(map(len, files)) / 2**20, 1)}
            figures["folder_prepare_s"] = _timed(lambda: prepare_sources([folder], cfg.data, cache=tmp / "c1",
                                                                         progress=False))
            figures["dicomweb_prepare_s"] = _timed(lambda: prepare_sources([source], cfg.data, cache=tmp / "c2",
                                                                           progress=False))
            options = FetchOptions(tmp / "c3", workers=args.workers, progress=False)
            figures["fetch_only_s"] = _timed(lambda: fetch(source, options, SkipLog()))
            figures["dicomweb_again_s"] = _timed(lambda: prepare_sources([source], cfg.data, cache=tmp / "c2",
                                                                         progress=False))
        finally:
            server.stop()
    n = figures["instances"]
    for key in ("folder_prepare", "dicomweb_prepare", "fetch_only", "dicomweb_again"):
        figures[f"{key}_per_s"] = round(n / figures[f"{key}_s"], 1)
    figures["dicomweb_over_folder_time"] = round(figures["dicomweb_prepare_s"] / figures["folder_prepare_s"], 2)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return round(time.perf_counter() - start, 2)


if __name__ == "__main__":
    sys.exit(main())

"""Time bonecluster's k-means backends against scikit-learn and compare their inertia.

Every run uses the same synthetic data, number of Lloyd iterations and a single
initialisation (sklearn: ``n_init=1, algorithm="lloyd", tol=0``).  Inertia is recomputed
for all backends with :func:`bonecluster.cluster.assign` so the numbers are comparable;
the ratio is relative to scikit-learn's result (lower is better).

Example::

    python benchmarks/bench_kmeans.py --n 40000 --d 256 --k 7 1000 --niter 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bonecluster.cluster import assign, faiss_available, kmeans

BACKENDS = ("torch", "faiss", "sklearn")


@dataclass
class Row:
    backend: str
    init: str
    k: int
    seconds: float
    inertia: float
    ratio_vs_sklearn: float | None = None
    n_splits: int | None = None


def make_mixture(n: int, d: int, n_components: int, seed: int) -> torch.Tensor:
    """``(n, d)`` float32 Gaussian mixture: random centres, per-component scales, low-rank shared noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_components, d, generator=generator) * 2.0
    scales = torch.rand(n_components, generator=generator) + 0.5
    labels = torch.randint(n_components, (n,), generator=generator)
    # A shared low-rank term correlates the dimensions, like CNN features.
    shared = torch.randn(n, 16, generator=generator) @ torch.randn(16, d, generator=generator) * 0.3
    return centres[labels] + scales[labels, None] * torch.randn(n, d, generator=generator) + shared


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    synchronise(device)
    start = time.perf_counter()
    centroids = run()
    synchronise(device)
    return time.perf_counter() - start, centroids


def exact_inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    _, sq_distances = assign(x, centroids.to(device=x.device, dtype=torch.float32))
    return float(sq_distances.double().sum())


def bench_bonecluster(x: torch.Tensor, k: int, args: argparse.Namespace, backend: str, init: str) -> Row:
    device = x.device
    outcome: dict = {}

    def run() -> torch.Tensor:
        result = kmeans(x, k, niter=args.niter, seed=args.seed, init=init, backend=backend, device=device)
        outcome["splits"] = result.n_splits
        return result.centroids

    seconds, centroids = timed(run, device)
    return Row(backend, init, k, seconds, exact_inertia(x, centroids), n_splits=outcome["splits"])


def bench_sklearn(x: torch.Tensor, k: int, args: argparse.Namespace) -> Row:
    from sklearn.cluster import KMeans

    data = x.cpu().numpy()
    model = KMeans(k, init="k-means++", n_init=1, max_iter=args.niter, tol=0.0, algorithm="lloyd",
                   random_state=args.seed)
    seconds, centroids = timed(lambda: torch.from_numpy(model.fit(data).cluster_centers_), torch.device("cpu"))
    return Row("sklearn", f"k-means++ ({model.n_iter_} it)", k, seconds, exact_inertia(x, centroids))


def run_all(x: torch.Tensor, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    backends = [name for name in BACKENDS if name not in args.skip]
    if "faiss" in backends and not faiss_available():
        print("faiss not installed: skipping it")
        backends.remove("faiss")
    for k in args.k:
        block = []
        for backend in ("torch", "faiss"):
            if backend in backends:
                block += [bench_bonecluster(x, k, args, backend, init) for init in ("k-means++", "random")]
        if "sklearn" in backends:
            block.append(bench_sklearn(x, k, args))
        reference = next((row.inertia for row in block if row.backend == "sklearn"), None)
        for row in block:
            row.ratio_vs_sklearn = row.inertia / reference if reference else None
        rows += block
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'backend':<8} {'init':<20} {'k':>5} {'seconds':>9} {'inertia':>14} {'vs sklearn':>10} {'splits':>6}")
    for row in rows:
        ratio = f"{row.ratio_vs_sklearn:.4f}" if row.ratio_vs_sklearn is not None else "-"
        splits = "-" if row.n_splits is None else str(row.n_splits)
        print(
            f"{row.backend:<8} {row.init:<20} {row.k:>5} {row.seconds:>9.2f} "
            f"{row.inertia:>14.6g} {ratio:>10} {splits:>6}"
        )


def environment(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if faiss_available():
        import faiss

        info["faiss"] = faiss.__version__
    try:
        import sklearn

        info["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40000, help="number of points")
    parser.add_argument("--d", type=int, default=256, help="dimension")
    parser.add_argument("--k", type=int, nargs="+", default=[7, 1000], help="cluster counts to time")
    parser.add_argument("--niter", type=int, default=20, help="Lloyd iterations for every backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--components", type=int, default=100, help="Gaussian components in the synthetic data")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--skip", nargs="*", default=[], choices=BACKENDS, help="backends to leave out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    x = make_mixture(args.n, args.d, args.components, args.seed).to(device)
    rows = run_all(x, args)
    print_table(rows)
    if args.json:
        report = {"config": vars(args), "environment": environment(device), "results": [asdict(r) for r in rows]}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

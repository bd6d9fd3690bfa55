"""Training speed: one stage-1 epoch of the engine vs a plain PyTorch loop, in the same run.

    python benchmarks/bench_train.py [DATA...] [--preset cpu] [--set key=value ...] [--json OUT]

Each side runs two epochs and the second is timed. The engine epoch = features of every image (precise-BN pass included when the preset asks for
it) + PCA-whitening + k-means + one pass of pseudo-label training, reading uint8 batches from the
decode-once cache and augmenting on the batch tensor. The plain loop does the same work the
textbook way: a PIL-decoding Dataset with torchvision transforms per image (RandomResizedCrop,
rotation, flip, colour jitter), a feature pass, scikit-learn k-means, and a training pass, with the
same model, batch size and image count. Without DATA it uses 1,400 phantoms.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class PlainImages(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("L")), i


def plain_epoch(paths, cfg, model, device) -> tuple[float, float]:
    """Seconds of one plain-loop epoch and its training images/s."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from torchvision import transforms as T

    size = cfg.data.size
    eval_tf = T.Compose([T.Resize((size, size)), T.ToTensor()])
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.RandomRotation(15),
                          T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2), T.ToTensor()])
    t0 = time.perf_counter()
    model.eval()
    feats = []
    with torch.no_grad():
        for x, _ in DataLoader(PlainImages(paths, eval_tf), batch_size=cfg.train.feature_batch_size):
            feats.append(model.features(x.to(device)).cpu())
    x = torch.cat(feats).numpy()
    x = PCA(min(cfg.cluster.pca_dim, *x.shape), whiten=True).fit_transform(x)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    labels = torch.as_tensor(KMeans(cfg.cluster.k, n_init=1, max_iter=cfg.cluster.niter).fit_predict(x), dtype=torch.int64)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    t1, seen = time.perf_counter(), 0
    loader = DataLoader(PlainImages(paths, train_tf), batch_size=cfg.train.batch_size, shuffle=True)
    for xb, idx in loader:
        loss = F.cross_entropy(model(xb.to(device)), labels[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(idx)
    end = time.perf_counter()
    return end - t0, seen / (end - t1)


def main(argv=None) -> dict:
    from bonecluster.config import load_config
    from bonecluster.data import prepare_sources
    from bonecluster.data.phantoms import generate_phantoms
    from bonecluster.device import pick_device
    from bonecluster.engine import DeepClusterEngine
    from bonecluster.models import build_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="*")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_train"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cfg = load_config(args.preset, overrides=args.overrides + ["train.epochs=3"])
    work = Path(args.work)
    sources = args.data or [work / "phantoms"]
    if not args.data and not (work / "phantoms").exists():
        generate_phantoms(work / "phantoms", n=1400, size=128, seed=0, progress=False)
    data = prepare_sources(sources, cfg.data, cache=work / "cache", progress=False)

    # Each path runs two epochs and the second is timed, so one-time start-up costs (thread
    # pools, kernel selection, the page cache) are charged to neither.
    fit = DeepClusterEngine(cfg, work / "run", progress=False).fit(data, stop_after=2)
    engine_s, engine_ips = float(fit.history[1]["seconds"]), float(fit.history[1]["images_per_s"])
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_clusters=cfg.cluster.k).to(device)
    paths = [r.path for r in data.records]
    plain_epoch(paths, cfg, model, device)
    plain_s, plain_ips = plain_epoch(paths, cfg, model, device)
    result = {"images": len(data), "size": cfg.data.size, "arch": cfg.model.arch, "device": str(device),
              "engine_epoch_seconds": round(engine_s, 2), "engine_train_images_per_s": round(engine_ips, 1),
              "plain_epoch_seconds": round(plain_s, 2), "plain_train_images_per_s": round(plain_ips, 1),
              "load_average": os.getloadavg()[0]}
    result["epoch_speedup"] = round(plain_s / engine_s, 2)
    print(f"{'':<14}{'epoch s':>10}{'train img/s':>14}")
    print(f"{'engine':<14}{engine_s:>10.1f}{engine_ips:>14.0f}")
    print(f"{'plain loop':<14}{plain_s:>10.1f}{plain_ips:>14.0f}")
    print(f"plain / engine epoch time: {result['epoch_speedup']:.2f}x  ({len(data)} images at {cfg.data.size} px, "
          f"{cfg.model.arch}, {device}, load {result['load_average']:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Pre-training on phantoms: teach a backbone the anatomy the generator drew, with no real label.

The phantom generator (:mod:`bonecluster.data.phantoms`) knows every film's body part, view and
finding by construction. A network trained to predict them has learned long-bone, hand-ray and
shoulder-dome shapes without seeing a real film: formula-driven pre-training (Kataoka et al.
2020, "Pre-training without natural images") with domain randomisation (Tobin et al. 2017),
since every film draws a new patient, pose, exposure and collimation.

The result is a weights file that any method starts from (``model.weights=FILE``); the label-free
method then adapts it to the real films. ``model.weights=phantoms`` does both in one run: the
pipeline pre-trains first (or reuses the file cached under the data cache for the same settings)
and writes the file's path into the run's resolved config.

    films   = render_corpus(20_000, cfg.data, seed)    # uint8 (N, S, S) + part / view / finding ids
    weights = pretrain_on_phantoms(cfg, "phantoms.pt")  # backbone state dict + phantoms.pt.json

Loss: the sum of one cross-entropy per task in ``phantoms.tasks`` (part: 7 classes, view: 4,
finding: normal + 4), each from its own linear head on the pooled backbone features; the heads
are saved beside the backbone (:func:`load_task_heads`), and the finding head's ``1 - p(normal)``
on real films is a label-free abnormality score (:func:`phantom_abnormality`). Views are
augmented with ``train.augment`` (crops, turns, flips, exposure, shutters), as the clustering
rounds are.

With ``phantoms.adapt > 0`` the pre-training also sees unlabelled real films (``real_films``):
a domain head behind a gradient-reversal layer learns to tell them from the phantoms, and the
backbone learns to make the two alike to it (Ganin & Lempitsky 2015, "Unsupervised domain
adaptation by backpropagation"). Their labels are never read; they have none here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bonecluster import BODY_PARTS
from bonecluster.augment import RadiographAugment, uint8_to_unit_float
from bonecluster.config import Config, DataConfig, PhantomPretrainConfig
from bonecluster.data.decode import fit_to_square, scale_percentiles
from bonecluster.data.phantoms import (FINDINGS, VIEWS, _default_workers, _progress_bar, check_annotations,
                                      check_children, check_framing, check_part_finding_sizes, check_texture,
                                      check_whole_arm, demo_finding_rules, render_labelled, reshare_film)
from bonecluster.device import bf16_fallback_message, cpu_bf16_hazard, mixed_precision, pick_device, seed_everything
from bonecluster.divergence import LossGuard, check_finite_state, precision_hint
from bonecluster.io import atomic_write_text
from bonecluster.models import DeepClusterNet, build_model

log = logging.getLogger(__name__)

# Bump when the corpus or the training changes what a cached weights file would hold.
PRETRAIN_VERSION = 1

# Class names per task; a finding's class 0 is "normal".
TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "part": tuple(BODY_PARTS),
    "view": tuple(VIEWS),
    "finding": ("normal",) + tuple(FINDINGS),
}

# Random stream of the re-shared copies (phantoms.reshare_p), apart from the films' own.
_RESHARE_STREAM = 606

# model.weights value that asks the pipeline to pre-train on phantoms first.
PHANTOMS = "phantoms"


# --------------------------------------------------------------------------- corpus


@dataclass
class PhantomCorpus:
    """Films as the network sees real ones (scaled, squared) and their known labels.

    Shapes: ``images`` uint8 ``(N, S, S)``; each ``labels[task]`` int64 ``(N,)`` indexing
    :data:`TASK_CLASSES`.
    """

    images: np.ndarray
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class _Slice:
    """Films ``first .. first+count-1`` of the labelled stream, and how to draw and prepare them."""

    first: int
    count: int
    seed: int
    data: DataConfig
    reshare_p: float
    texture: float
    framing: float
    children: float
    whole_arm: float
    annotations: float
    part_finding_sizes: bool = False


def _render_slice(job: _Slice) -> tuple[np.ndarray, np.ndarray]:
    """The slice's films, prepared like a decoded real film: percentile scaling (the cache's)
    then the configured fit to a square. A ``reshare_p`` share of them are first turned into
    re-shared copies (:func:`reshare_film`); ``texture``, ``framing``, ``children``, ``whole_arm``,
    ``annotations`` and ``part_finding_sizes`` are :func:`render_labelled`'s. Returns images uint8 ``(count, S, S)`` and labels int64
    ``(count, tasks)``."""
    size = job.data.size
    images = np.empty((job.count, size, size), dtype=np.uint8)
    labels = np.empty((job.count, len(TASK_CLASSES)), dtype=np.int64)
    for i in range(job.count):
        index = job.first + i
        film = render_labelled(index, size, job.seed, texture=job.texture, framing=job.framing,
                               children=job.children, whole_arm=job.whole_arm, annotations=job.annotations,
                               part_finding_sizes=job.part_finding_sizes)
        pixels = film.pixels
        if job.reshare_p > 0:   # its own stream: switching it on leaves the films themselves unchanged
            rng = np.random.default_rng([job.seed, _RESHARE_STREAM, index])
            if rng.random() < job.reshare_p:
                pixels = reshare_film(pixels, rng)
        images[i] = fit_to_square(scale_percentiles(pixels, job.data.pct_low, job.data.pct_high), size, job.data.fit)
        labels[i] = (TASK_CLASSES["part"].index(film.part), TASK_CLASSES["view"].index(film.view),
                     TASK_CLASSES["finding"].index(film.finding or "normal"))
    return images, labels


def film_options(p: PhantomPretrainConfig) -> dict:
    """The ``phantoms`` settings that change how the films look, as :func:`render_corpus`'s keywords."""
    return {"reshare_p": p.reshare_p, "texture": p.texture, "framing": p.framing, "children": p.children,
            "whole_arm": p.whole_arm, "annotations": p.annotations, "part_finding_sizes": p.part_finding_sizes}


def render_corpus(n: int, data: DataConfig, seed: int = 0, first: int = 0, workers: int | None = None,
                  progress: bool = True, reshare_p: float = 0.0, texture: float = 0.0,
                  framing: float = 0.0, children: float = 0.0, whole_arm: float = 0.0,
                  annotations: float = 0.0, part_finding_sizes: bool = False) -> PhantomCorpus:
    """Films ``first .. first+n-1`` of the labelled phantom stream at ``data.size`` with ``data.fit``.

    Rendering takes about 3 ms a film at 96 px on one core; ``workers`` processes (default: one
    per core, none for small sets, as ``generate_phantoms``) share it. The same arguments give the same bytes.
    """
    if n < 1:
        raise ValueError(f"phantoms.films must be at least 1, got {n}")
    if workers is None:
        workers = _default_workers(n)
    chunk = 256
    if not 0.0 <= reshare_p <= 1.0:
        raise ValueError(f"phantoms.reshare_p must be in [0, 1], got {reshare_p}")
    texture, framing, children = check_texture(texture), check_framing(framing), check_children(children)
    whole_arm, annotations = check_whole_arm(whole_arm), check_annotations(annotations)
    part_finding_sizes = check_part_finding_sizes(part_finding_sizes)
    jobs = [_Slice(first + s, min(chunk, n - s), seed, data, reshare_p, texture, framing, children, whole_arm,
                   annotations, part_finding_sizes)
            for s in range(0, n, chunk)]
    bar = _bar(n, progress, "phantom films")
    parts = []
    try:
        if workers <= 1:
            for job in jobs:
                parts.append(_render_slice(job))
                bar.update(job.count)
        else:
            # spawn: safe when the caller already runs torch threads.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for done in pool.map(_render_slice, jobs):
                    parts.append(done)
                    bar.update(len(done[0]))
    finally:
        bar.close()
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return PhantomCorpus(images, {task: labels[:, j] for j, task in enumerate(TASK_CLASSES)})


# --------------------------------------------------------------------------- domain adaptation


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``-weight`` backward (DANN's gradient-reversal layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """``x`` unchanged; what flows back through it is multiplied by ``-weight``."""
    return _ReverseGradient.apply(x, weight)


def adversary_weight(progress: float, adapt: float) -> float:
    """The reversal weight at ``progress`` (0 at the first step, 1 at the last) of training:
    ``adapt * (2 / (1 + exp(-10 p)) - 1)``, DANN's ramp (Ganin & Lempitsky 2015, §5.2.1), which
    keeps the domain head's early, noisy gradients from disturbing the backbone."""
    return adapt * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


class DomainHead(nn.Module):
    """Pooled features ``(N, D)`` -> one logit per film ``(N,)``: real film (1) or phantom (0)."""

    def __init__(self, feature_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


@dataclass
class _Adversary:
    """The domain-adversarial part of pre-training: the head, the real films it sees (uint8
    ``(M, S, S)``), ``phantoms.adapt`` and the number of steps the ramp spans."""

    head: DomainHead
    films: np.ndarray
    adapt: float
    total_steps: int
    step: int = 0
    correct: int = 0
    seen: int = 0
    loss_sum: float = 0.0

    def loss(self, features: torch.Tensor, n_phantoms: int) -> torch.Tensor:
        """Binary cross-entropy of the domain head on ``features`` ``(n_phantoms + n_real, D)``,
        phantoms first, through the gradient reversal at this step's weight."""
        weight = adversary_weight(self.step / max(self.total_steps - 1, 1), self.adapt)
        self.step += 1
        logits = self.head(reverse_gradient(features, weight)).float()
        target = torch.zeros_like(logits)
        target[n_phantoms:] = 1.0
        self.correct += int(((logits > 0).float() == target).sum())
        self.seen += len(target)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        self.loss_sum += float(loss.detach()) * len(target)
        return loss

    def take_epoch(self) -> dict[str, float]:
        """Since the last call: ``domain_loss`` (mean binary cross-entropy per film) and
        ``domain_accuracy`` (share of films the head told apart; 0.5: it cannot)."""
        seen = max(self.seen, 1)
        row = {"domain_loss": self.loss_sum / seen, "domain_accuracy": self.correct / seen}
        self.correct = self.seen = 0
        self.loss_sum = 0.0
        return row


def check_real_films(films: np.ndarray | None, p: PhantomPretrainConfig, size: int) -> np.ndarray | None:
    """The real films domain adaptation needs, checked against ``phantoms.adapt`` and ``data.size``;
    None when ``adapt`` is 0 (they are then not used)."""
    if not (p.adapt >= 0 and math.isfinite(p.adapt)):
        raise ValueError(f"phantoms.adapt must be a finite number >= 0, got {p.adapt}")
    if p.adapt == 0:
        return None
    if films is None or len(films) == 0:
        raise ValueError(f"phantoms.adapt={p.adapt} needs unlabelled real films to adapt to, and none were given: "
                         "`bonecluster pretrain-phantoms --adapt-to DATA` names them, and a `train` run with "
                         "model.weights=phantoms (or stage2.weights=phantoms) adapts to its own training films")
    if films.ndim != 3 or films.shape[1:] != (size, size) or films.dtype != np.uint8:
        raise ValueError(f"the real films to adapt to must be uint8 (N, {size}, {size}) at data.size, "
                         f"got {films.dtype} {tuple(films.shape)}")
    return films


def films_digest(films: np.ndarray) -> str:
    """A short digest of a uint8 film array's shape and bytes (what a cached file adapted to)."""
    h = hashlib.sha256(repr(tuple(films.shape)).encode())
    h.update(np.ascontiguousarray(films).data)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- training


@dataclass
class PretrainResult:
    weights: Path                 # the backbone state dict (model.weights=...)
    seconds: float
    history: list[dict]           # per epoch: loss, and held-out phantom accuracy per task


def check_tasks(tasks) -> tuple[str, ...]:
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASK_CLASSES]
    if not tasks or unknown:
        raise ValueError(f"phantoms.tasks must name some of {', '.join(TASK_CLASSES)}, got {list(tasks)}")
    return tasks


class TaskHeads(nn.Module):
    """One linear classifier per task on the pooled features: ``(N, D)`` -> {task: ``(N, classes)``}."""

    def __init__(self, feature_dim: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({t: nn.Linear(feature_dim, len(TASK_CLASSES[t])) for t in tasks})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: head(features) for t, head in self.heads.items()}


def _start_weights(weights: str) -> str:
    """Pre-training starts from model.weights unless that asks for this very pre-training."""
    return "none" if str(weights).lower() == PHANTOMS else weights


def pretrain_on_phantoms(cfg: Config, out: str | Path, progress: bool = True,
                         real_films: np.ndarray | None = None) -> PretrainResult:
    """Train ``cfg.model``'s backbone on ``cfg.phantoms.films`` labelled phantoms; write ``out``.

    ``out`` gets the backbone state dict (``{"model": {"backbone.*": tensor}}``, what
    ``model.weights`` reads) and ``out.json`` the settings, per-epoch loss and the accuracy per
    task on ``phantoms.validation_films`` other phantoms. Both are written atomically.
    ``real_films`` (uint8 ``(M, S, S)`` at ``data.size``, no labels) are the films that
    ``phantoms.adapt > 0`` adapts to; they are ignored when it is 0.
    """
    p: PhantomPretrainConfig = cfg.phantoms
    tasks = check_tasks(p.tasks)
    real_films = check_real_films(real_films, p, cfg.data.size)
    out = Path(out)
    t0 = time.perf_counter()
    device = pick_device(cfg.train.device)
    seed_everything(cfg.seed)
    train_set = render_corpus(p.films, cfg.data, seed=cfg.seed, workers=cfg.data.workers or None, progress=progress,
                              **film_options(p))
    valid_set = render_corpus(p.validation_films, cfg.data, seed=cfg.seed, first=p.films,
                              workers=cfg.data.workers or None, progress=False,
                              **film_options(p)) if p.validation_films else None
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_clusters=len(BODY_PARTS), weights=_start_weights(cfg.model.weights),
                        image_size=cfg.data.size).to(device)
    heads = TaskHeads(model.feature_dim, tasks).to(device)
    params = list(model.backbone.parameters()) + list(heads.parameters())
    steps = p.epochs * max(len(train_set) // p.batch_size, 1)
    adversary = None
    if real_films is not None:
        adversary = _Adversary(DomainHead(model.feature_dim).to(device), real_films, p.adapt, steps)
        params += list(adversary.head.parameters())
    opt = torch.optim.SGD(params, lr=p.lr, momentum=0.9, weight_decay=p.weight_decay, nesterov=True)
    augment = RadiographAugment(cfg.train.augment)
    use_amp, dtype = mixed_precision(cfg.train, device)
    use_amp = use_amp and dtype == torch.bfloat16   # no loss scaler here: float16 GPUs train in float32
    hazard = cpu_bf16_hazard(model, cfg.data.size, device, dtype) if use_amp else []
    if hazard:
        use_amp = False
        log.warning(bf16_fallback_message("data.size", cfg.data.size, hazard, "phantom pre-training in float32"))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=steps, pct_start=0.1,
                                                anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(p.epochs):
        loss = _train_epoch(model, heads, train_set, tasks, opt, sched, augment, generator, device, use_amp,
                            p.batch_size, progress, f"phantom pre-training {epoch + 1}/{p.epochs}", adversary)
        row = {"epoch": epoch + 1, "loss": round(loss, 4)}   # the tasks' loss, as without adaptation
        if adversary is not None:   # accuracy 0.5: the domain head cannot tell the phantoms from the real films
            row.update({k: round(v, 4) for k, v in adversary.take_epoch().items()})
        if valid_set is not None:
            row.update({f"valid_{t}_accuracy": round(a, 4) for t, a in
                        task_accuracy(model, heads, valid_set, tasks, device, p.batch_size).items()})
        history.append(row)
        log.info("phantom pre-training %s", row)
    seconds = time.perf_counter() - t0
    check_finite_state(model, "phantom pre-training", precision_hint("bfloat16" if use_amp else "float32", device.type),
                       kept="no weights file was written")
    _save(model, heads, out, {"version": PRETRAIN_VERSION, "phantoms": asdict(p), "model": _model_settings(cfg),
                       "data": _data_settings(cfg.data), "augment": asdict(cfg.train.augment), "seed": cfg.seed,
                       "device": str(device), "seconds": round(seconds, 1), "history": history,
                       **_adapted_to(real_films)})
    return PretrainResult(out, seconds, history)


def _adapted_to(real_films: np.ndarray | None) -> dict:
    return {} if real_films is None else {"adapted_to": {"films": len(real_films), "digest": films_digest(real_films)}}


def _train_epoch(model, heads, corpus, tasks, opt, sched, augment, generator, device, use_amp, batch_size,
                 progress, desc, adversary: _Adversary | None = None) -> float:
    """One pass over ``corpus``; with an ``adversary`` each batch of phantoms is joined by as many
    real films (drawn with replacement, augmented the same way) for the domain loss."""
    model.train()
    heads.train()
    if adversary is not None:
        adversary.head.train()
    order = torch.randperm(len(corpus), generator=generator).numpy()
    n_batches = max(len(corpus) // batch_size, 1)   # drop the last partial batch (BatchNorm)
    labels = {t: torch.from_numpy(corpus.labels[t]) for t in tasks}
    total, bar = 0.0, _bar(n_batches, progress, desc)
    guard = LossGuard(desc, "bfloat16" if use_amp else "float32", device.type, kept="no weights file was written")
    try:
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = augment(uint8_to_unit_float(torch.from_numpy(corpus.images[idx]).to(device)), generator=generator)
            if adversary is not None:
                pick = torch.randint(len(adversary.films), (len(idx),), generator=generator).numpy()
                real = uint8_to_unit_float(torch.from_numpy(adversary.films[np.sort(pick)]).to(device))
                x = torch.cat([x, augment(real, generator=generator)])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                features = model.features(x)
                logits = heads(features[:len(idx)])
                loss = sum(F.cross_entropy(logits[t].float(), labels[t][idx].to(device)) for t in tasks)
                domain = adversary.loss(features, len(idx)) if adversary is not None else 0.0
            opt.zero_grad(set_to_none=True)
            (loss + domain).backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            guard(float((loss + domain).detach()), b)   # the domain loss too: reversal can diverge
            total += float(loss.detach())
            bar.update(1)
    finally:
        bar.close()
    return total / n_batches


@torch.no_grad()
def task_probabilities(model: DeepClusterNet, heads: TaskHeads, images: np.ndarray, device: torch.device,
                       batch_size: int = 256) -> dict[str, np.ndarray]:
    """Each head's class probabilities for films prepared as in pre-training (no augmentation,
    eval-mode BN): uint8 ``(N, S, S)`` -> {task: float32 ``(N, classes)``}, classes in
    :data:`TASK_CLASSES` order."""
    model.eval()
    heads.eval()
    out: dict[str, list[np.ndarray]] = {t: [] for t in heads.heads}
    for s in range(0, len(images), batch_size):
        x = uint8_to_unit_float(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size]))).to(device)
        for t, logits in heads(model.features(x)).items():
            out[t].append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return {t: np.concatenate(p) if p else np.zeros((0, len(TASK_CLASSES[t])), np.float32) for t, p in out.items()}


def task_accuracy(model: DeepClusterNet, heads: TaskHeads, corpus: PhantomCorpus, tasks, device,
                  batch_size: int = 256) -> dict[str, float]:
    """Share of ``corpus`` films whose label each head predicts (no augmentation, eval-mode BN)."""
    probabilities = task_probabilities(model, heads, corpus.images, device, batch_size)
    return {t: float((probabilities[t].argmax(1) == corpus.labels[t]).mean()) for t in tasks}


def phantom_abnormality(probabilities: dict[str, np.ndarray]) -> np.ndarray:
    """The finding head's probability of *any* finding, ``1 - p(normal)``: ``(N,)``.

    A label-free abnormality score for real films: the head learnt fractures, plates, lesions and
    dislocations on phantoms only, so no real label shapes it.
    """
    if "finding" not in probabilities:
        raise ValueError("these phantom weights were pre-trained without the 'finding' task (phantoms.tasks)")
    return 1.0 - probabilities["finding"][:, 0]


def load_task_heads(path: str | Path) -> TaskHeads:
    """The task heads saved beside the backbone in a ``pretrain-phantoms`` weights file."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing file, pickle / zip errors carry no file name
        raise ValueError(f"could not read phantom weights file {str(path)!r}: {err}") from err
    state = obj.get("heads") if isinstance(obj, dict) else None
    if not state:
        raise ValueError(f"phantom weights file {str(path)!r} holds no task heads: it was written before they were "
                         f"kept (2026-12-06) or by something else; run `bonecluster pretrain-phantoms` again")
    tasks = tuple(t for t in TASK_CLASSES if f"heads.{t}.weight" in state)
    if not tasks:
        raise ValueError(f"phantom weights file {str(path)!r}: its heads name no task of {', '.join(TASK_CLASSES)}")
    heads = TaskHeads(int(state[f"heads.{tasks[0]}.weight"].shape[1]), tasks)
    try:
        heads.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"phantom weights file {str(path)!r}: its task heads do not fit ({err})") from err
    return heads.eval()


def _save(model: DeepClusterNet, heads: TaskHeads, out: Path, meta: dict) -> None:
    """Backbone (what ``model.weights`` reads) and the task heads (:func:`load_task_heads`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {f"backbone.{k}": v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    head_state = {k: v.detach().cpu() for k, v in heads.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"model": state, "heads": head_state}, tmp)
    os.replace(tmp, out)
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(meta, indent=2))


# --------------------------------------------------------------------------- cached weights


def _model_settings(cfg: Config) -> dict:
    settings = {"arch": cfg.model.arch, "sobel": cfg.model.sobel, "small_input": cfg.model.small_input,
                "start": _start_weights(cfg.model.weights)}
    if cfg.model.backbone_kwargs:   # only when set: the keys of files cached before it existed stay valid
        settings["backbone_kwargs"] = cfg.model.backbone_kwargs
    return settings


def _data_settings(data: DataConfig) -> dict:
    return {"size": data.size, "fit": data.fit, "pct_low": data.pct_low, "pct_high": data.pct_high}


def weights_key(cfg: Config, real_films: np.ndarray | None = None) -> str:
    """A short digest of every setting that changes the pre-trained weights, except the device and
    ``model.channels_last``, which change them only by float rounding; with ``phantoms.adapt`` set,
    of the real films adapted to as well."""
    phantoms = asdict(cfg.phantoms)
    for later in ("framing", "children", "whole_arm", "annotations", "part_finding_sizes", "adapt"):   # only when set: the keys of files cached before them stay valid
        if not phantoms[later]:
            del phantoms[later]
    settings = {"version": PRETRAIN_VERSION, "phantoms": phantoms, "model": _model_settings(cfg),
                "data": _data_settings(cfg.data), "augment": asdict(cfg.train.augment), "seed": cfg.seed}
    if cfg.phantoms.part_finding_sizes:   # what "the demo's findings" are has changed (rules PP, HD, WF2)
        settings["part_findings"] = demo_finding_rules()
    real_films = check_real_films(real_films, cfg.phantoms, cfg.data.size)
    if real_films is not None:
        settings["adapted_to"] = films_digest(real_films)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]


def cached_weights_path(cfg: Config, cache: str | Path, real_films: np.ndarray | None = None) -> Path:
    """Where :func:`cached_phantom_weights` keeps the file for these settings (absolute)."""
    return (Path(cache) / "phantom-weights" / f"{weights_key(cfg, real_films)}.pt").resolve()


def cached_phantom_weights(cfg: Config, cache: str | Path, progress: bool = True,
                           real_films: np.ndarray | None = None) -> Path:
    """``cache/phantom-weights/KEY.pt``, pre-training it first unless a file for these settings is there."""
    path = cached_weights_path(cfg, cache, real_films)
    if path.is_file() and path.with_name(path.name + ".json").is_file():
        log.info("phantom pre-training: reusing %s", path)
        return path
    pretrain_on_phantoms(cfg, path, progress=progress, real_films=real_films)
    return path


def _bar(total: int, enabled: bool, desc: str):
    return _progress_bar(total, enabled, desc=desc, unit="it")

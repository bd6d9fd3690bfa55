"""Few-label mode for stage 2 (``--labels-fraction F``, off by default).

Few-label mode (``stage2.labels_fraction`` F > 0, off by default): per part, a seeded random
F of the part's labelled training *studies* is picked without looking at labels
(:func:`choose_label_subset`); the labels of their images, and no others, fit an L2 logistic
probe on the part model's features (:class:`FewLabelProbe`). Its probability (threshold 0.5) is
scored apart from the label-free result (``metrics.json``'s ``stage2_few_labels``).

The probe then self-trains on the part's *unlabelled* training images
(:func:`bonecluster.selftrain.self_train`, ``stage2.probe_self_train`` rounds). MURA labels whole
studies, so each unlabelled study's images share one pseudo-label, taken from their mean
probability; the probe is refitted on its labels plus those pseudo-labels. The share of
unlabelled studies called abnormal is unknown (a few labelled studies estimate it poorly), so one
probe is self-trained per share in ``stage2.probe_pseudo_share`` (0.3 to 0.7 by default) and their
probabilities are averaged. No label outside the chosen subset is read.

The few-label score mixes in the label-free score (``stage2.probe_mix`` w, 0.25 by default):
``(1 - w) * percentile(probe probability) + w * percentile(label-free score)``, each percentile
among the part's training images (:meth:`FewLabelProbe.with_mix`). It is flagged abnormal at the
value that flags as many training images as the probe's own 0.5 does.

Files: ``RUN/stage2/<PART>/probe.pt`` (the probe and the audit of the labels it used).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bonecluster.anomaly import percentile_of
from bonecluster.config import Stage2Config
from bonecluster.data.cache import PreparedDataset
from bonecluster.checkpoint import TrainedClusters, load_torch, save_torch
from bonecluster.data.records import study_key
from bonecluster.descriptors import hog_features, mirror
from bonecluster.selftrain import (mean_probability, model_rows, probability, self_train_per_share, share_list,
                                   standardisation)
from bonecluster.stage2.scoring import PartAnomaly, part_features

log = logging.getLogger("bonecluster")

PROBE = "probe.pt"  # RUN/stage2/<PART>/probe.pt: the probe and its audit
PROBE_FEATURES = ("global", "layer3", "score", "hog")
PROBE_CS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # inverse L2 strengths tried by the probe's CV
PROBE_DEFAULT_C = 0.03                                # when the labelled subset is too small to CV
PROBE_THRESHOLD = 0.5                                 # flag = probe probability >= 0.5


def study_keys(records) -> list[str]:
    """A study id per record (an image without a study is its own study), as in study_index."""
    return [study_key(r) for r in records]


@dataclass
class LabelSubset:
    """The training labels the few-label probe may use, and how they were chosen.

    ``positions`` index the records given to :func:`choose_label_subset` (for a part: its
    training images in ``RUN/data.json`` order). ``n_seen`` counts the studies whose label was
    read: ``len(studies)``, unless the first random pick held one class only and the walk down
    the same random order had to read further labels to find the other class.
    """

    positions: np.ndarray          # (n,) int64, sorted
    studies: list[str]
    n_labelled_studies: int
    n_labelled_images: int
    n_seen: int

    @property
    def n_images(self) -> int:
        return len(self.positions)


def labels_to_choose(fraction: float, n_labelled_studies: int) -> int:
    """round(fraction * n), halves rounded up (not Python's round-half-to-even)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"stage2.labels_fraction must be in [0, 1], got {fraction}")
    return int(np.floor(fraction * n_labelled_studies + 0.5))


def choose_label_subset(records, fraction: float, seed: int = 0, salt: str = "") -> LabelSubset:
    """Pick round(fraction * S) of the S labelled studies among ``records``; use their labels only.

    The pick is label-blind: a seeded random order of the labelled studies (``salt``, e.g. the
    body part, varies it between parts), of which the first n are taken. Whether a record has a
    label is known; its value is read only for the studies picked. If those n studies (n >= 2)
    hold one class only, the walk continues down the same order, reading one more label at a
    time, until a study of the other class is found; it replaces the last pick (so both classes
    appear when the data allows, and the count stays n). Every image of a picked study whose
    label is known is used.
    """
    keys = study_keys(records)
    labelled: dict[str, list[int]] = {}
    for i, (key, rec) in enumerate(zip(keys, records)):
        if rec.abnormal is not None:
            labelled.setdefault(key, []).append(i)
    studies = list(labelled)
    n = labels_to_choose(fraction, len(studies))
    n_images = sum(len(v) for v in labelled.values())
    if n == 0:
        return LabelSubset(np.zeros(0, np.int64), [], len(studies), n_images, 0)

    def label(s: int) -> bool:   # the only place a label value is read
        return any(bool(records[i].abnormal) for i in labelled[studies[s]])

    rng = np.random.default_rng([int(seed), zlib.crc32(salt.encode())])
    order = rng.permutation(len(studies))
    chosen = list(order[:n])
    seen = {s: label(s) for s in chosen}
    if n >= 2 and len(set(seen.values())) == 1:
        for s in order[n:]:
            seen[s] = label(s)
            if seen[s] != seen[chosen[0]]:
                chosen[-1] = s
                break
    positions = np.sort(np.concatenate([labelled[studies[s]] for s in chosen])).astype(np.int64)
    return LabelSubset(positions, sorted(studies[s] for s in chosen), len(studies), n_images, len(seen))


def parse_probe_features(spec: str) -> tuple[tuple[str, ...], int, bool]:
    """``"global+layer3+score"`` -> (("global", "layer3", "score"), 0, False);
    ``"hog+pca32+flip"`` -> (("hog",), 32, True)."""
    kinds, pca, flip = [], 0, False
    for item in (s.strip() for s in spec.split("+")):
        if item in PROBE_FEATURES and item not in kinds:
            kinds.append(item)
        elif item.startswith("pca") and item[3:].isdigit() and int(item[3:]) > 0:
            pca = int(item[3:])
        elif item == "flip" and not flip:
            flip = True
        else:
            raise ValueError(f"stage2.probe_features: unknown or repeated item {item!r} in {spec!r} "
                             f"(use {', '.join(PROBE_FEATURES)}, optionally pcaN and flip, joined by '+')")
    if not kinds:
        raise ValueError(f"stage2.probe_features {spec!r} names no features")
    return tuple(kinds), pca, flip


def probe_matrix(trained: TrainedClusters, images: np.ndarray, kinds, unsupervised: torch.Tensor | None,
                 batch_size: int = 256) -> torch.Tensor:
    """The probe's raw features of images (uint8 (N, S, S)); deep features only when asked for."""
    if "global" in kinds or "layer3" in kinds:
        pooled, patches = part_features(trained, images, batch_size)
    else:
        pooled = patches = None
    return probe_inputs(kinds, pooled, patches, unsupervised, images)


def probe_inputs(kinds, pooled: torch.Tensor, patches: torch.Tensor,
                 unsupervised: torch.Tensor | None, images: np.ndarray | None = None) -> torch.Tensor:
    """The probe's raw feature matrix (N, D) from :func:`part_features`, the unsupervised scores
    and (for ``hog``) the images themselves."""
    cols = []
    if "global" in kinds:
        cols.append(pooled.float())
    if "layer3" in kinds:
        cols.append(patches.float().mean(dim=1))
    if "score" in kinds:
        if unsupervised is None:
            raise ValueError("the probe uses the unsupervised score; pass it")
        cols.append(torch.log(unsupervised.float().clamp_min(1e-6)).view(-1, 1))
    if "hog" in kinds:
        if images is None:
            raise ValueError("the probe uses HOG features; pass the images")
        cols.append(hog_features(images))
    return torch.cat(cols, dim=1)


@dataclass
class FewLabelProbe:
    """An L2-regularised logistic regression on a part model's features, fitted on a few labels.

    Inputs are standardised with the mean and spread of *all* the part's training images (no
    labels needed), optionally projected on their top principal components, then
    ``p = mean_e sigmoid(z @ coef[e] + intercept[e])`` over its E models (one per self-training
    share; E = 1 without self-training). ``C`` is chosen by study-grouped, stratified
    cross-validation on the labelled subset only (AUROC of out-of-fold probabilities).
    Everything is tensors and plain values, so the file loads with ``weights_only=True``.
    """

    features: str
    mean: torch.Tensor             # (D,)
    scale: torch.Tensor            # (D,)
    projection: torch.Tensor | None  # (D, d) or None
    coef: torch.Tensor             # (E, d), one row per model
    intercept: torch.Tensor        # (E,)
    C: float
    cv_auroc: float | None
    fraction: float
    seed: int
    label_positions: list          # positions among the part's training images (RUN/data.json order)
    label_paths: list
    n_studies: int                 # labelled studies used
    n_labelled_studies: int        # labelled studies the part's training data had
    n_labelled_images: int
    n_seen: int                    # studies whose label was read (see LabelSubset)
    n_abnormal: int                # abnormal images among those used
    self_train_rounds: int = 0     # rounds of self-training on the unlabelled images (see self_train)
    pseudo_shares: tuple = ()      # (E,) abnormal share given to the unlabelled studies, per model
    mix: float = 0.0               # weight of the label-free score in score() (see with_mix)
    threshold: float = PROBE_THRESHOLD   # flag = score() >= threshold
    train_probabilities: torch.Tensor | None = None   # (N,) the probe's probabilities of the training images
    train_unsupervised: torch.Tensor | None = None    # (N,) their label-free scores

    def __post_init__(self) -> None:
        # Probes saved before the share ensemble hold one model: coef (d,) and a float intercept.
        self.coef, self.intercept = model_rows(self.coef, self.intercept)
        self.pseudo_shares = tuple(float(v) for v in self.pseudo_shares)

    @property
    def n_labels(self) -> int:
        return len(self.label_positions)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw features -> (N,) probability of abnormal, the mean over the E models."""
        z = (x.float() - self.mean) / self.scale
        if self.projection is not None:
            z = z @ self.projection
        return mean_probability(z, self.coef, self.intercept)

    def score(self, trained: TrainedClusters, images: np.ndarray, anomaly: PartAnomaly | None = None,
              unsupervised: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        """The few-label score of new images (uint8 (M, S, S)) with the part model ``trained``:
        (M,) in [0, 1], abnormal at ``self.threshold``. Without a mix it is the probe's probability.

        A probe that uses the unsupervised score, or mixes it in, needs it: pass ``unsupervised``
        (M,) or the part's ``anomaly`` to compute it.
        """
        if len(images) == 0:
            return torch.zeros(0)
        kinds, _, _ = parse_probe_features(self.features)
        if ("score" in kinds or self.mix > 0) and unsupervised is None:
            if anomaly is None:
                raise ValueError("this probe uses the unsupervised score: pass anomaly or unsupervised")
            unsupervised = anomaly.score(trained, images, batch_size)
        prob = self.probability(trained, images, unsupervised, batch_size)
        return self.mixed(prob, unsupervised) if self.mix > 0 else prob

    def probability(self, trained: TrainedClusters, images: np.ndarray, unsupervised: torch.Tensor | None,
                    batch_size: int = 256) -> torch.Tensor:
        """The probe's own probability of abnormal (M,) for uint8 (M, S, S) images."""
        kinds, _, flip = parse_probe_features(self.features)
        mirrored = probe_matrix(trained, mirror(images), kinds, unsupervised, batch_size) if flip else None
        return self.view_probability(probe_matrix(trained, images, kinds, unsupervised, batch_size), mirrored)

    def view_probability(self, features: torch.Tensor, mirrored: torch.Tensor | None = None) -> torch.Tensor:
        """Probability from raw probe features (M, D); with ``mirrored`` (M, D), the features of the
        left-right mirrored images (a ``flip`` probe), the mean of the two views' probabilities."""
        prob = self.predict_proba(features)
        return prob if mirrored is None else (prob + self.predict_proba(mirrored)) / 2

    def mixed(self, probability: torch.Tensor, unsupervised: torch.Tensor) -> torch.Tensor:
        """(1 - mix) * percentile of the probability + mix * percentile of the label-free score,
        both among the training images': (M,) in [0, 1]."""
        return ((1 - self.mix) * percentile_of(self.train_probabilities, probability)
                + self.mix * percentile_of(self.train_unsupervised, unsupervised.float()))

    def with_mix(self, mix: float, train_probabilities: torch.Tensor, train_unsupervised: torch.Tensor
                 ) -> "FewLabelProbe":
        """This probe scoring with ``mix`` of the label-free score (0 = the probability alone).

        ``train_probabilities`` and ``train_unsupervised`` (N,): the probe's probabilities and the
        label-free scores of the part's N training images, the reference of both percentiles. The
        threshold flags the same share of training images as the probe's 0.5 does (a few more
        where training scores tie with the threshold), so the mix changes which images are
        flagged, not how many (no label is read to set it).
        """
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"stage2.probe_mix must be in [0, 1], got {mix}")
        if mix == 0:
            return replace(self, mix=0.0, threshold=PROBE_THRESHOLD, train_probabilities=None,
                           train_unsupervised=None)
        probs, unsup = train_probabilities.float().flatten(), train_unsupervised.float().flatten()
        if len(probs) != len(unsup) or len(probs) == 0:
            raise ValueError(f"one probability and one label-free score per training image, "
                             f"got {len(probs)} and {len(unsup)}")
        mixed = replace(self, mix=float(mix), train_probabilities=probs, train_unsupervised=unsup)
        flagged = float((probs >= PROBE_THRESHOLD).float().mean())
        train_scores = mixed.mixed(probs, unsup).double().numpy()
        # flag the top `flagged` share of the training images' mixed scores; none when the probe flags none
        mixed.threshold = (float(np.quantile(train_scores, 1 - flagged, method="higher")) if flagged > 0
                           else float(np.nextafter(np.float32(1.0), np.float32(2.0))))   # above any float32 score
        return mixed

    def audit(self) -> dict:
        return {"labels_fraction": self.fraction, "labels_seed": self.seed, "images": self.n_labels,
                "studies": self.n_studies, "abnormal_images": self.n_abnormal,
                "labelled_studies": self.n_labelled_studies, "labelled_images": self.n_labelled_images,
                "studies_seen": self.n_seen, "features": self.features, "C": self.C,
                "cv_auroc": None if self.cv_auroc is None else round(self.cv_auroc, 4),
                "self_train_rounds": self.self_train_rounds, "pseudo_shares": [round(v, 4) for v in self.pseudo_shares],
                "mix": self.mix, "threshold": round(self.threshold, 6)}

    def save(self, path: Path) -> None:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["label_positions"] = torch.as_tensor(self.label_positions, dtype=torch.int64)
        save_torch(path, d)

    @classmethod
    def load(cls, path: Path) -> "FewLabelProbe":
        d = load_torch(path)
        d["label_positions"] = [int(i) for i in d["label_positions"]]
        # Probes saved before self-training existed lack its two fields; their defaults fit them.
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def study_labels(labels: np.ndarray, groups: np.ndarray) -> dict:
    """{study: abnormal} from image labels; a study is abnormal if any of its images is."""
    out: dict = {}
    for g, t in zip(groups, np.asarray(labels, bool)):
        out[g] = out.get(g, False) or bool(t)
    return out


def fit_probe_weights(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0
                      ) -> tuple[np.ndarray, float, float, float | None]:
    """L2 logistic regression (balanced classes) on standardised ``x``; C by grouped CV.

    Returns (coef, intercept, C, cv_auroc). C minimises the class-balanced log loss of the
    out-of-fold probabilities (it rewards ranking and a usable 0.5 threshold alike; AUROC alone
    cannot tell a strong C from a weak one whose probabilities all sit at 0.5); ``cv_auroc`` is
    the out-of-fold AUROC at that C. The folds keep a study's images together and are stratified
    by class; with fewer than two studies per class there is no CV and C is
    :data:`PROBE_DEFAULT_C`. Ties go to the smaller C (stronger regularisation).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y, bool)
    per_class = np.bincount(np.fromiter(study_labels(y, groups).values(), int), minlength=2)
    folds = int(min(5, per_class.min()))
    best_c, best_auc, best_loss = PROBE_DEFAULT_C, None, np.inf
    if folds >= 2:
        split = list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups))
        weight = np.where(y, 0.5 / y.mean(), 0.5 / (1 - y.mean()))   # balanced, like the fit
        for c in PROBE_CS:
            oof = np.full(len(y), 0.5)
            for tr, te in split:
                if y[tr].all() or not y[tr].any():
                    continue
                m = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x[tr], y[tr])
                oof[te] = m.predict_proba(x[te])[:, 1]
            loss = float(log_loss(y, oof, sample_weight=weight, labels=[False, True]))
            if loss < best_loss - 1e-9:
                best_c, best_loss, best_auc = c, loss, float(roc_auc_score(y, oof))
    model = LogisticRegression(C=best_c, class_weight="balanced", max_iter=5000).fit(x, y)
    return model.coef_.ravel(), float(model.intercept_[0]), float(best_c), best_auc


def study_prevalence(labels: np.ndarray, groups: np.ndarray) -> float:
    """Share of abnormal studies among the labelled ones."""
    return float(np.mean(list(study_labels(labels, groups).values())))


def fit_probe(features_all: torch.Tensor, subset: LabelSubset, labels: np.ndarray, groups: np.ndarray,
              spec: str, fraction: float, seed: int, paths: list[str],
              mirrored_all: torch.Tensor | None = None, all_groups: np.ndarray | None = None,
              self_train_rounds: int = 0, pseudo_share: float | tuple | str = "prevalence") -> FewLabelProbe:
    """Fit the probe on ``features_all[subset.positions]`` with ``labels`` (one per position).

    ``features_all`` (N, D) covers all the part's training images: they set the standardisation
    (and the optional PCA) without labels. Only the subset's rows and ``labels`` are supervised.
    ``mirrored_all`` (N, D), for ``flip``: the features of the left-right mirrored images; the
    subset's mirrored rows join the fit with the same labels (same images, no new label).
    ``self_train_rounds`` > 0 then self-trains (:func:`bonecluster.selftrain.self_train`) on the
    other N - n images, grouped by ``all_groups`` (N,) study ids, once per share in
    ``pseudo_share`` (the share of them pseudo-labelled abnormal; ``"prevalence"`` = the labelled
    studies' abnormal share, kept within [0.1, 0.9]); the probe keeps one model per share.
    """
    _, pca_dim, _ = parse_probe_features(spec)
    x_all = features_all.double()
    mean, scale = standardisation(x_all)
    z_all = (x_all - mean) / scale
    projection = None
    if pca_dim:
        d = min(pca_dim, z_all.shape[0] - 1, z_all.shape[1])
        _, _, v = torch.linalg.svd(z_all - z_all.mean(0), full_matrices=False)
        projection = v[:d].T.contiguous()
        z_all = z_all @ projection
    z_mirror_all = None
    if mirrored_all is not None:
        z_mirror_all = (mirrored_all.double() - mean) / scale
        if projection is not None:
            z_mirror_all = z_mirror_all @ projection
    rows = torch.as_tensor(subset.positions)
    x = z_all[rows].numpy()
    n_abnormal = int(np.asarray(labels, bool).sum())
    shares = pseudo_shares(pseudo_share, labels, groups)
    if z_mirror_all is not None:
        x = np.concatenate([x, z_mirror_all[rows].numpy()])
        labels, groups = np.concatenate([labels, labels]), np.concatenate([groups, groups])
    coef, intercept, c, cv_auc = fit_probe_weights(x, labels, groups, seed)
    fitted = None
    others = np.setdiff1d(np.arange(len(z_all)), subset.positions)
    if self_train_rounds > 0 and len(others) > 0:
        if all_groups is None:
            raise ValueError("self-training needs the study id of every training image (all_groups)")
        views = [z_all[others].numpy()] + ([] if z_mirror_all is None else [z_mirror_all[others].numpy()])
        fitted = self_train_per_share(views, np.asarray(all_groups)[others], probability(views, coef, intercept),
                                      shares, c, self_train_rounds, labelled_x=x, labelled_y=labels)
    if fitted is None:   # the labelled-only probe
        self_train_rounds, shares = 0, ()
    else:
        shares, coef, intercept = fitted
    return FewLabelProbe(spec, mean.float(), scale.float(), None if projection is None else projection.float(),
                         *model_rows(coef, intercept), c, cv_auc, float(fraction),
                         int(seed), [int(i) for i in subset.positions], list(paths), len(subset.studies),
                         subset.n_labelled_studies, subset.n_labelled_images, subset.n_seen, n_abnormal,
                         int(self_train_rounds), shares)


def pseudo_shares(setting: float | tuple | str, labels: np.ndarray | None = None,
                  groups: np.ndarray | None = None) -> tuple[float, ...]:
    """The self-training shares of ``stage2.probe_pseudo_share``: one share, several, or
    ``"prevalence"`` (the labelled studies' abnormal share, kept within [0.1, 0.9]; only then are
    ``labels`` and their study ``groups`` read)."""
    if setting == "prevalence":
        return (float(np.clip(study_prevalence(labels, groups), 0.1, 0.9)),)
    return share_list(setting, "stage2.probe_pseudo_share ('prevalence' or shares)")


def train_part_probe(trained: TrainedClusters, data: PreparedDataset, anomaly: PartAnomaly, s2: Stage2Config,
                     part: str = "", *, batch_size: int) -> FewLabelProbe | None:
    """The few-label probe of one part (``data``: its training images), or None with a warning
    when the labelled subset is empty or holds one class only. ``batch_size``:
    ``train.feature_batch_size``."""
    kinds, _, flip = parse_probe_features(s2.probe_features)
    subset = choose_label_subset(data.records, s2.labels_fraction, s2.labels_seed, salt=part)
    labels = np.array([bool(data.records[i].abnormal) for i in subset.positions], bool)
    if subset.n_images == 0 or labels.all() or not labels.any():
        log.warning("stage 2: no few-label probe for %s (%d labelled studies of %d picked at labels_fraction=%g "
                    "hold %s; both classes are needed)", part, len(subset.studies), subset.n_labelled_studies,
                    s2.labels_fraction, "no labels" if subset.n_images == 0 else "one class only")
        return None
    images = data.images()
    feats = probe_matrix(trained, images, kinds, anomaly.train_scores, batch_size)
    mirrored = (probe_matrix(trained, mirror(images), kinds, anomaly.train_scores, batch_size) if flip else None)
    keys = study_keys(data.records)
    groups = np.array([keys[i] for i in subset.positions])
    probe = fit_probe(feats, subset, labels, groups, s2.probe_features, s2.labels_fraction, s2.labels_seed,
                      [data.records[i].path for i in subset.positions], mirrored, np.array(keys),
                      s2.probe_self_train, s2.probe_pseudo_share)
    if s2.probe_mix == 0:
        return probe
    return probe.with_mix(s2.probe_mix, probe.view_probability(feats, mirrored), anomaly.train_scores)

"""Typed dataclass configs, YAML presets (``cpu``, ``paper``) and ``--set key=value`` overrides.

The resolved config is written into every run folder (``config.yaml``), as timm does with
``args.yaml``, so a run can be resumed, evaluated or served with exactly its settings.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from bonecluster.augment import AugmentConfig
from bonecluster.data.decode import Limits, Preprocess
from bonecluster.data.readers import ReaderLimits

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    """Decoding and caching. ``size`` is the square side the network sees.

    The input limits (``LIMITS``) bound what one file or CSV row may cost; over a limit the file
    or row is skipped with a warning naming it and the limit. Each has a CLI flag on the commands
    that read data (``--max-pixels``, ``--max-frames``, ``--max-file-mb``,
    ``--max-csv-row-chars``), sugar for ``--set data.<field>=...``.
    """

    size: int = 64                 # 0 = the backbone's default (224 for the ResNets; a timm model's own)
    fit: str = "squash"            # "squash", "letterbox" (keeps aspect, pads), "deskew" (straightens, crops, letterboxes)
    #                                or "crop" (cuts to the film's box, squashes)
    pct_low: float = 0.5           # robust intensity scaling percentiles
    pct_high: float = 99.5
    pixel_cap: int = 64_000_000    # decompression-bomb guard: width*height above it is skipped (--max-pixels)
    max_frames: int = 16           # DICOMs with more frames are skipped (--max-frames)
    max_file_mb: float = 512       # files over this many MB (2**20 bytes) are skipped unread (--max-file-mb)
    max_csv_row_chars: int = 65_536  # longer CSV rows are skipped, a longer header is an error (--max-csv-row-chars)
    cache: str = ""                # decode-once cache folder; "" = <run or output folder>/cache
    workers: int = 0               # decoding processes; 0 = one per core (at most 8)

    # The input-limit fields, each with its CLI flag.
    LIMITS: ClassVar[dict[str, str]] = {"pixel_cap": "--max-pixels", "max_frames": "--max-frames",
                                        "max_file_mb": "--max-file-mb",
                                        "max_csv_row_chars": "--max-csv-row-chars"}

    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.size, fit=self.fit, pct_low=self.pct_low, pct_high=self.pct_high)

    def limits(self) -> Limits:
        """The decoding limits (pixel cap, frame count, file size in bytes); ValueError when one
        is not positive."""
        self.check_limits()
        return Limits(pixel_cap=self.pixel_cap, max_frames=self.max_frames,
                      max_file_bytes=int(self.max_file_mb * 2**20))

    def reader_limits(self) -> ReaderLimits:
        """The CSV limits for the readers."""
        self.check_limits()
        return ReaderLimits(max_csv_row_chars=self.max_csv_row_chars)

    def check_limits(self) -> None:
        """ValueError naming the config key and its flag when a limit is not positive."""
        for name, flag in self.LIMITS.items():
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if name == "max_file_mb":
                ok, what = number and math.isfinite(value) and value * 2**20 >= 1, "number"
            else:
                ok, what = number and isinstance(value, int) and value > 0, "integer"
            if not ok:
                raise ValueError(f"data.{name} ({flag}) must be a positive {what}, got {value!r}")

    def with_limits(self, **values: Any) -> "DataConfig":
        """A copy with some input limits replaced (e.g. a run's config, for ``predict``)."""
        unknown = sorted(set(values) - set(self.LIMITS))
        if unknown:
            raise ValueError(f"not an input limit: {', '.join(unknown)} (limits: {', '.join(self.LIMITS)})")
        out = merge(self, values, "data.")
        out.check_limits()
        return out


@dataclass
class ModelConfig:
    """The CNN (see :class:`bonecluster.models.DeepClusterNet`)."""

    # resnet18, resnet34, resnet50 (torchvision); timm/<name>: any timm model, e.g.
    # timm/convnext_tiny or timm/vit_small_patch14_dinov2.lvd142m (pip install 'bonecluster[timm]');
    # or hf/<repo id or folder>: a transformers encoder, e.g. hf/microsoft/rad-dino ([hf]);
    # docs/backbones.md
    arch: str = "resnet18"
    sobel: bool = True             # DeepCluster's fixed Sobel front end
    # none; pretrained (the hub's weights for a timm/ or hf/ name, fetched on your machine; ImageNet
    # for a ResNet); imagenet (torchvision's, ResNets); a .pt / .safetensors file or a folder holding
    # one; or phantoms (pre-train on labelled phantoms first, see PhantomPretrainConfig; the file
    # is cached under the data cache)
    weights: str = "none"
    small_input: bool = False      # True: 3x3 stem without max-pool (4-16x slower on CPU); ResNets only
    # extra constructor arguments of a timm/ backbone, e.g. {drop_path_rate: 0.1} or {depth: 2};
    # config fields of an hf/ one, e.g. {num_hidden_layers: 6}
    backbone_kwargs: dict = field(default_factory=dict)
    # True: train the heads only (top layer, projection head); the backbone keeps its loaded
    # weights and BatchNorm statistics (so train.feature_bn is treated as "running")
    freeze: bool = False
    # NHWC memory order for the convolutions: the same network and numbers up to float rounding,
    # 0.75x the time of a SimCLR step on a 2-core CPU (benchmarks/bench_memory_format.py; GPUs not
    # measured yet). False: NCHW, the order of every figure measured before 2026-12-03.
    channels_last: bool = True


@dataclass
class ClusterConfig:
    """Features -> PCA-whitening -> L2 -> k-means (DeepCluster eq. 6)."""

    k: int = 7
    # Clusters of the training rounds' pseudo-labels; 0 = k. Over-clustering (train_k > k, as
    # DeepCluster's 10,000 clusters for 1,000 ImageNet classes) is meant to stop a round that
    # merged two groups from teaching the network to merge them; the final clustering always uses
    # k. On phantoms train_k = 30 measured no better than k (docs/BENCHMARKS.md).
    train_k: int = 0
    pca_dim: int = 256             # capped by the number of images and the feature size
    # How much the PCA whitens: each axis is scaled by eigenvalue ** eigen_power. -0.5 whitens
    # (DeepCluster, faiss PCAMatrix), so every kept axis weighs the same in k-means' distances;
    # 0 keeps PCA's variances, so the axes that vary most weigh most. On real films 0 raised the
    # mean of three held-out evaluations on three test networks, fracture-parts slightly lower
    # (docs/RESULTS.md), so the cpu-real preset uses it. Applies to either cluster.subspace;
    # stage 2's part models always whiten.
    eigen_power: float = -0.5
    niter: int = 20
    init: str = "k-means++"        # or "random"
    backend: str = "auto"          # auto (faiss when installed), faiss or torch
    collapse_share: float = 0.95   # stop early when one cluster holds more than this share
    n_init: int = 1                # k-means restarts per round; the lowest inertia wins (unsupervised)
    # Top layer at the start of each round: "random" = DeepCluster's N(0, 0.01) re-init (§3.2);
    # "centroids" = DeepCluster-v2 (Caron et al. 2020, SwAV paper App. A): the nearest-centroid
    # classifier of the new clustering, mapped back through the PCA-whitening.
    top_layer_init: str = "random"
    centroid_temperature: float = 0.1  # logits = cosine(feature, centroid) / T for "centroids"
    sinkhorn_epsilon: float = 0.05 # entropy weight of the balanced assignment (method sela)
    # Cluster studies, not images: every round (and the final clustering) runs k-means on the
    # L2-normalised mean embedding of each study, and each image takes its study's cluster. A study
    # shows one body part in several views, so pseudo-labels that agree within a study teach the
    # network the part, not the view (patient metadata as positives: Vu et al. 2021, MedAug).
    # Images without a study id are their own study; no label is read. Stage 2 clusters images.
    by_study: bool = False
    # Over-clusters merged through shared studies (bonecluster.study_links): the final clustering
    # makes this many k-means clusters (K > k), links two clusters by the film pairs of one study
    # they hold between them, and cuts that graph into k groups (spectral clustering). A study shows
    # one part in views that differ in framing and exposure, what k-means splits real films on.
    # 0 = off. Used only where it is above k, there are more films than it, and at least half of the
    # films have a study mate (else plain k-means, with a log line saying why); not with by_study
    # (which puts a study in one cluster, so nothing links), sela or simclr-scan.
    study_links: int = 0
    # Space k-means works in: "none" = PCA-whiten all features (DeepCluster); "phantom-parts" =
    # PCA-whiten only inside the <= 6 directions that tell phantom body parts apart (LDA on
    # `subspace_films` labelled phantoms embedded by the same network; bonecluster.phantom_subspace).
    # No real label is read; the phantoms are prepared at data.size / data.fit.
    subspace: str = "none"
    subspace_films: int = 3500

    @property
    def round_k(self) -> int:
        """Clusters per training round (``train_k``, or ``k`` when it is 0)."""
        return self.train_k or self.k


@dataclass
class TrainConfig:
    """Pseudo-label training (DeepCluster eq. 5): SGD with momentum, uniform label sampling."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    device: str = "auto"           # auto, cuda, cuda:N, mps or cpu
    amp: bool = True               # mixed precision on CUDA (on a CPU only with cpu_amp)
    # bfloat16 autocast on a CPU too, where it has bf16 in hardware (AVX512-BF16 or AMX: 2-3x faster
    # there); a CPU without it trains in float32 and the log says so. Needs `amp`.
    cpu_amp: bool = False
    # torch.compile the backbone, in place (nn.Module.compile: the weights' names, and so every run
    # file, stay as they are). A second batch shape, train/eval and autocast switches each compile
    # again, and precise BN breaks the graph, so it pays only on long runs, mostly on a GPU.
    compile: bool = False
    workers: int = 0               # DataLoader workers reading the cache (0 = main process)
    feature_batch_size: int = 256
    images_per_epoch: int = 0      # images drawn per training pass; 0 = the dataset size
    lr_schedule: str = "constant"  # "constant" or "cosine" (decays to lr_min_ratio * lr at the last epoch)
    lr_min_ratio: float = 0.0
    warmup_epochs: int = 0         # linear learning-rate warm-up over the first epochs
    top_lr_scale: float = 1.0      # the top layer's learning rate is lr * top_lr_scale
    # The backbone's learning rate is lr * backbone_lr_scale (DeepCluster's train.lr and SimCLR's /
    # DINO's selfsup.lr alike); heads keep theirs. Below 1 fine-tunes pretrained weights gently.
    backbone_lr_scale: float = 1.0
    # Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020; BEiT s2.3): the backbone's last
    # stage keeps lr * backbone_lr_scale and each stage below it gets `layer_lr_decay` times the
    # one above (a ResNet: layer4 1, layer3 d, layer2 d^2, layer1 d^3, stem d^4), so fine-tuning
    # moves the general early filters of pretrained weights least. 1 = one rate for the whole
    # backbone (the default); ResNet backbones only.
    layer_lr_decay: float = 1.0
    # BatchNorm statistics used when extracting features for k-means:
    # "running" = eval mode with the running averages (reference code);
    # "recompute" = re-estimate the averages over the whole (unaugmented) dataset first
    #   ("precise BN", Wu & Johnson 2021), so features never use stale or untrained statistics;
    # "batch" = per-batch statistics of the extraction batches (train-mode BN, running stats untouched).
    feature_bn: str = "running"
    # With feature_bn=recompute, estimate the statistics on at most this many images (a seeded
    # subset, the same every epoch; 0 = all). Means and variances over a few hundred images x
    # every pixel position are already steady, and the pass then costs a fraction of the
    # feature pass on a large dataset (docs/BENCHMARKS.md, "Where the demo's time goes").
    bn_images: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class Stage2Config:
    """One deep-clustering model per body part, scored for abnormality without labels.

    The engine settings are stage 1's (model, cluster, train) with these replacements.
    """

    k: int = 10                    # clusters per part: normal anatomy varies with the view
    epochs: int = 10               # 0: the part network is scored as it starts (stage2.weights), untrained
    # Where each part network starts: "same" (stage 1's model.weights, as the run resolved it) or
    # any model.weights value: "none", "phantoms" (pre-trained on labelled phantoms at stage 2's
    # size, stage2.size, and this run's network, cached under the data cache; bonecluster.phantom_pretrain), "imagenet",
    # "pretrained" or a weights file.
    weights: str = "same"
    # The square side stage 2's films are decoded to, apart from stage 1's (its own decode-once
    # store in the same cache; the part networks, their phantom pre-training and every stage-2
    # prediction use it). 0 = data.size, stage 1's. A fracture line or a screw is a pixel or two
    # at 64 px (issue 27).
    size: int = 0
    knn: int = 5                   # abnormality = mean cosine distance to the k nearest training images
    fallback_quantile: float = 0.9 # threshold when the two-mode mixture finds no split
    min_images: int = 20           # parts with fewer images are skipped (with a warning)
    study_score: str = "mean"      # study score from its images: "mean" (MURA's convention) or "max"
    # The abnormality score (see bonecluster.anomaly): "global" (kNN on pooled final features),
    # "patch" (PatchCore-style max over layer3 positions of the nearest-patch distance) or
    # "global+patch" (both, each divided by its training median, averaged).
    score: str = "global+patch"
    pca_dim: int = 64              # PCA-whitening of the global bank, fitted per part (not cluster.pca_dim)
    patch_knn: int = 1             # neighbours per patch (1 = PatchCore)
    patch_bank_size: int = 100000  # at most this many training patches are kept (seeded random subset)
    # PatchCore's two pieces beyond the nearest-patch distance (Roth et al. 2022): each layer3
    # position averaged over its patch_pool x patch_pool neighbourhood before it is compared
    # ("locally aware patch features", section 3.1; odd; 1 = the position alone, PatchCore uses 3), and a
    # greedy coreset keeping this share of the training patches, at most patch_bank_size, instead of
    # every patch or a random subset (section 3.2; 0 = off). Neither helped on real films at 128 px,
    # so both are off (docs/RESULTS.md, rule PC).
    patch_pool: int = 1
    patch_coreset: float = 0.0
    # Label-free refinement of that score (0 rounds = off): the training images' kNN scores,
    # averaged per study, call the top refine_share abnormal; a HOG logistic regression (inverse
    # L2 strength refine_C) is fitted to those pseudo-labels on each image and its mirror, its
    # probabilities re-rank the studies, and so on (bonecluster.selftrain). The last fit becomes
    # the part's score. The abnormal share is unknown without labels, so refine_share may list
    # several: one model per share, their probabilities averaged. It amplifies the seed's
    # direction. On held-out MURA humerus, over nine DeepCluster training seeds, the kNN score's
    # image AUROC of 0.53 became 0.651 with one share (0.5) and 0.678 with the 0.3-0.7 ensemble
    # (worst seed 0.522 -> 0.587); the SimCLR score's went from 0.486 to 0.457 (docs/RESULTS.md),
    # so the cpu-real preset (SimCLR) switches it off.
    refine_rounds: int = 4
    refine_share: float | tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    refine_C: float = 0.003
    # Stage-2 networks per part that seed the refinement (seeds seed, seed+1, ...): their kNN
    # scores of the training images are averaged by rank before the first fit. One DeepCluster
    # network is a noisy seed; on held-out humerus, 3 networks gave 0.700 +- 0.026 over 84 triplets
    # of nine networks against 0.678 +- 0.047 for one (docs/RESULTS.md). Training time grows with
    # it; prediction does not (the refiner scores alone). The extra networks keep only their scores
    # (RUN/stage2/PART/seed-net-I/seed_scores.pt). Ignored when refine_rounds is 0. `bonecluster
    # demo` uses 1 to stay within its 10 minutes.
    networks: int = 3
    # Few-label mode (off at 0): a logistic probe on the part model's features may use the labels
    # of this fraction of each part's labelled training *studies* (seeded random choice, see
    # bonecluster.stage2.fewlabel.choose_label_subset). Reported apart from the unsupervised result.
    labels_fraction: float = 0.0
    labels_seed: int = 0
    # Probe inputs, "+"-joined: hog (histograms of oriented gradients of the film), global (the part
    # model's pooled final features), layer3 (mean of its L2-normalised layer3 positions), score
    # (log of the label-free score); pcaN = project onto N principal components of all the part's
    # training images (no labels) first; flip = also fit on the labelled images' left-right
    # mirrors (same labels) and average both views' probabilities. On held-out MURA humerus with
    # 5% of the labels, HOG beat the part model's own features (image AUROC ~0.72 vs ~0.56, mean
    # over 5 label seeds) and flip added ~0.06.
    probe_features: str = "hog+score+flip"
    # Rounds of self-training on the part's unlabelled training images (0 = off): each
    # unlabelled study gets one pseudo-label from its images' mean probe probability, and the
    # probe is refitted on labels + pseudo-labels (bonecluster.selftrain.self_train). On held-out
    # MURA humerus with 5% of the labels it raised the image AUROC from 0.764 to 0.792 (mean over
    # label seeds 0-14; 0.756 to 0.788 on seeds 5-14, unseen when it was chosen; docs/RESULTS.md).
    probe_self_train: int = 3
    # The share of unlabelled studies pseudo-labelled abnormal in self-training: one share, a list
    # (one probe per share, their probabilities averaged) or "prevalence" (the labelled studies'
    # abnormal share, the first version). On held-out MURA humerus, label seeds 0-14, the 0.3-0.7
    # list gave 0.802 against 0.794 for "prevalence" (0.795 against 0.791 on seeds 5-14, unseen
    # when it was chosen; docs/RESULTS.md).
    probe_pseudo_share: float | tuple[float, ...] | str = (0.3, 0.4, 0.5, 0.6, 0.7)
    # Weight of the label-free score in the few-label score (0 = the probe's probability alone):
    # score = (1 - w) * percentile of the probe's probability + w * percentile of the label-free
    # score, both among the part's training images; flagged at the mixed score that flags as many
    # training images as the probe's 0.5 does (bonecluster.stage2.fewlabel.FewLabelProbe.with_mix). On
    # held-out MURA humerus, label seeds 0-14 on two trained runs (pre-registered rule), 0.25
    # raised the image AUROC from 0.801 to 0.817 and the worst seed from 0.698 to 0.749 (0.5:
    # 0.808; docs/RESULTS.md).
    probe_mix: float = 0.25


def _contrastive_augment() -> AugmentConfig:
    # SimCLR's views must differ much more than DeepCluster's (Chen et al. 2020, §3: crop + colour
    # are what make the task hard): smaller crops, larger rotations (real films are rotated by
    # tens of degrees), stronger exposure changes and shutters.
    return AugmentConfig(crop_scale=(0.25, 1.0), rotation_degrees=30.0, brightness=(0.6, 1.4),
                         contrast=(0.6, 1.4), gamma=(0.6, 1.6), noise_std=0.02, shutter_p=0.5)


@dataclass
class SelfSupConfig:
    """Self-supervised pre-training: SimCLR (Chen et al. 2020) for the ``simclr*`` methods, MoCo (He
    et al. 2020) for ``moco``, DINO (Caron et al. 2021) for ``dino``.

    SGD with momentum, linear warm-up then cosine decay to 0 over ``epochs``; the projection head
    is dropped afterwards and clustering uses the backbone's pooled features (for ``dino``, the
    teacher's). ``hidden_dim`` and ``proj_dim`` size DINO's MLP too (``proj_dim`` is its bottleneck).
    """

    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 2
    temperature: float = 0.2       # tau of the NT-Xent loss (and of MoCo's InfoNCE)
    hidden_dim: int = 512          # projection head: feature_dim -> hidden_dim -> proj_dim
    proj_dim: int = 128
    augment: AugmentConfig = field(default_factory=_contrastive_augment)
    # Study mates (bonecluster.study_mates; MedAug, Vu et al. 2021): with this probability an
    # image's second view is made from another film of its study, when it has one, so the two
    # views show one part in two projections. 0 = off (draws nothing); study ids only, no label.
    study_pair_p: float = 0.0
    # Multi-crop (SwAV, Caron et al. 2020 s3.2): this many extra small views of every image, each a
    # crop of `local_scale` of the film's area resized to `local_size` px (0 = data.size // 2),
    # with the views' other augmentations. Each is pulled to both full-size views by NT-Xent
    # (SimCLR's pre-training: simclr, simclr-deepcluster, simclr-scan; one process). 0 = off (draws
    # nothing; the views are as before).
    local_crops: int = 0
    local_size: int = 0
    local_scale: tuple[float, float] = (0.05, 0.25)
    # simclr-phantoms: weight of the labelled phantoms' task loss beside NT-Xent (methods/simclr_phantoms.py)
    phantom_weight: float = 1.0
    # MoCo only (methods/moco.py): the queue of earlier keys that serve as negatives beside the batch's
    # own (MoCo v2 keeps 65,536 of 1.28 M images; here about a quarter of a few thousand films, so that
    # a film's own key from the last epoch has left the queue before it returns; never more than half
    # the number of films), the key encoder's momentum (MoCo's 0.999 is for ~10^5 steps; a few hundred
    # to a few thousand here), and the number of groups the key batch is split into after a shuffle
    # (MoCo's "shuffle BN" in one process).
    moco_queue: int = 1024
    moco_momentum: float = 0.99
    moco_bn_groups: int = 4
    # DINO only. Its paper starts the teacher's momentum at 0.996 over about 10^5 steps; a few
    # thousand images make a few hundred steps here, so the teacher starts faster (0.99, cosine to 1).
    dino_prototypes: int = 256
    dino_student_temperature: float = 0.1
    dino_teacher_temperature: float = 0.04
    dino_momentum: float = 0.99
    dino_center_momentum: float = 0.9


@dataclass
class ScanConfig:
    """SCAN's clustering step on the frozen pre-trained features (method ``simclr-scan``)."""

    neighbours: int = 20           # nearest neighbours mined per image (SCAN §2.2 uses 20)
    views: int = 4                 # augmented copies embedded per image (train.augment)
    epochs: int = 100              # passes of the classifier over the images
    batch_size: int = 256
    lr: float = 0.001              # Adam
    entropy_weight: float = 5.0    # SCAN's lambda: keeps every cluster in use
    heads: int = 5                 # classifiers trained side by side; the lowest SCAN loss wins


@dataclass
class PhantomPretrainConfig:
    """Supervised pre-training on labelled phantoms (:mod:`bonecluster.phantom_pretrain`).

    Used by ``bonecluster pretrain-phantoms`` and when ``model.weights`` is ``phantoms``; the
    network is ``model``'s, the images are ``data.size`` / ``data.fit``, the views are augmented
    with ``train.augment``.
    """

    films: int = 20000             # training films, each of a new patient (about 3 ms each to draw at 96 px)
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05               # one-cycle: warm-up over the first 10% of steps, cosine decay after
    weight_decay: float = 1e-4
    tasks: tuple[str, ...] = ("part", "view", "finding")  # what the generator knows; one head each
    validation_films: int = 1000   # other phantoms, for the per-task accuracy in the weights' .json
    # Share of films turned into re-shared copies first (turned by 90-degree steps, darkened,
    # low-contrast, JPEG-blocked: data.phantoms.reshare_film), as many real films found online are.
    reshare_p: float = 0.0
    # Strength of trabecular streaks in the marrow and mottled soft tissue (data.phantoms.texture_field):
    # 0 draws them flat, 1 is the default ranges, up to 2.
    texture: float = 0.0
    # How widely magnification, centring and shutters vary (data.phantoms.render_labelled): 0 as the
    # demo's phantoms (magnification 0.85-1.08, shutters up to 13% of a side), 1 wider (0.65-1.30,
    # 30%), up to 2.
    framing: float = 0.0
    # Share of films drawn as a child's (data.phantoms.child_patient): slimmer bones and open growth
    # plates near both ends of each long bone's shaft; 0 draws adults only, as the demo's phantoms.
    # 0.3 by rule Y (2026-12-06, docs/RESULTS.md): phantoms alone, two pre-training seeds, the mean
    # over the three real-film evaluations 0.454 -> 0.499, none lower.
    children: float = 0.3
    # Share of HUMERUS and FOREARM films drawn as a whole arm (data.phantoms.add_whole_arm): the rest
    # of the same patient's arm around the part, the film zoomed out; 0 draws the part alone.
    # 0.3 failed rules W and W2 (2026-12-06, docs/RESULTS.md): phantoms alone, two pre-training
    # seeds, the mean over the three real-film evaluations 0.499 -> 0.478.
    whole_arm: float = 0.0
    # Share of films with extra burned-in annotations (data.phantoms.add_annotations): a side marker
    # as a bright square tag or ring, lines of small text, a ruler along one edge; 0 draws only the
    # plain side and view letters that every phantom carries. 0.3 failed rule AN (2026-12-06,
    # docs/RESULTS.md): phantoms alone, two pre-training seeds, the mean over the three real-film
    # evaluations 0.499 -> 0.511, under the +0.03 bar.
    annotations: float = 0.0
    # Draw the findings as the demo's phantoms do: with the per-part minimum sizes
    # (data.phantoms.FINDING_SIZE_FACTOR: three times the example sizes on ELBOW, FINGER, HAND,
    # SHOULDER and WRIST since rule PP, 2026-12-07) and sites (METACARPAL_FINDINGS: HAND's fractures
    # and dislocations at the metacarpals, swollen, since rule HD; FOREARM_BONE_FRACTURES: WRIST's
    # fractures at the radius and ulna, since rule WF2) instead of the example sizes and
    # every site on every part. False keeps the pre-training films every real-film figure was measured
    # with; true failed rule PT (2026-12-07, before rule HD; docs/RESULTS.md): phantoms alone, two
    # pre-training seeds, the mean over the three real-film evaluations 0.579 -> 0.571, FracAtlas
    # regions 0.488 -> 0.417.
    part_finding_sizes: bool = False
    # Weight of a domain-adversarial loss (Ganin & Lempitsky 2015, DANN): a small head behind a
    # gradient-reversal layer learns to tell the phantoms from the run's own unlabelled real films
    # (`pretrain-phantoms --adapt-to DATA`, or the run's training films with model.weights=phantoms),
    # and the backbone learns to make the two look alike to it, so what it learnt of phantom anatomy
    # applies to real films. The reversal weight ramps from 0 to this value (DANN's 2/(1+exp(-10p))-1
    # over training). No real label is read. 0 (the default) trains on phantoms alone. 1 failed rule DA
    # (2026-12-06, docs/RESULTS.md): phantoms alone, two pre-training seeds, the mean over the three
    # real-film evaluations 0.579 -> 0.522, all three lower; adapted to upper-limb films only (rule DA-U,
    # two more seeds), the two evaluations inside those films 0.608 -> 0.604.
    adapt: float = 0.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    selfsup: SelfSupConfig = field(default_factory=SelfSupConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    phantoms: PhantomPretrainConfig = field(default_factory=PhantomPretrainConfig)
    method: str = "deepcluster"
    seed: int = 0


# ----------------------------------------------------------------------------- loading


def load_config(preset: str | None = "cpu", config_file: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults, then a preset, then a YAML file, then ``key=value`` overrides (last wins)."""
    cfg = Config()
    if preset:
        cfg = merge(cfg, read_yaml(preset_path(preset)))
    if config_file:
        cfg = merge(cfg, read_yaml(Path(config_file)))
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    return resolve_size(cfg)


def resolve_size(cfg: Config) -> Config:
    """``data.size: 0`` -> the backbone's own input size (224 for the ResNets, a timm model's own)."""
    if cfg.data.size != 0:
        return cfg
    from bonecluster.backbones import default_size

    return merge(cfg, {"data": {"size": default_size(cfg.model.arch)}})


def stage2_data_config(cfg: Config) -> DataConfig:
    """Stage 1's data settings at stage 2's size (``stage2.size``; 0 keeps ``data.size``): how
    stage 2's films are decoded."""
    return dataclasses.replace(cfg.data, size=cfg.stage2.size or cfg.data.size)


def preset_names() -> list[str]:
    """The presets shipped with the package (``presets/*.yaml``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown preset {name!r} (available: {', '.join(preset_names())})")
    return path


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read config ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections")
    return data


def merge(cfg: Any, values: dict, where: str = "") -> Any:
    """A copy of dataclass ``cfg`` with ``values`` (nested dicts) applied, types checked."""
    names = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown config key {where + key!r} (known: {', '.join(names)})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where + key!r} is a section; give a mapping")
            changes[key] = merge(current, value, f"{where}{key}.")
        else:
            changes[key] = coerce(value, _field_type(cfg, key), where + key)
    return dataclasses.replace(cfg, **changes)


def apply_override(cfg: Config, item: str) -> Config:
    """``'train.lr=0.1'`` -> a copy of cfg with that field set (value parsed as YAML)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. train.lr=0.05)")
    dotted, raw = item.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return merge(cfg, value)


def _field_type(cfg: Any, name: str) -> Any:
    return typing.get_type_hints(type(cfg))[name]


def coerce(value: Any, kind: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's annotated type (int, float, str, bool, X | None, tuple)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ValueError:
                pass
        raise ValueError(f"config {key}={value!r}: expected {kind}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {key}={value!r}: expected a list")
        inner = typing.get_args(kind)[0] if typing.get_args(kind) else Any
        items = [coerce(v, inner, key) if inner is not Any else v for v in value]
        return tuple(items) if origin is tuple else items
    if kind is Any:
        return value
    if kind is dict or origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ValueError(f"config {key}={value!r}: expected a mapping, e.g. {{depth: 2}}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config {key}={value!r}: expected true or false")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"config {key}={value!r}: expected {getattr(kind, '__name__', kind)}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_from_dict(values: dict) -> Config:
    return merge(Config(), values)

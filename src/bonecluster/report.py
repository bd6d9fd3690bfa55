"""One self-contained HTML report (opens offline: every figure is an inline PNG).

Sections: headline metrics beside the published figures; stage-1 confusion matrix (clusters x
body parts) and training curves (loss, NMI between consecutive epochs); a 2-D t-SNE map of the
stage-1 embeddings coloured by cluster and by label; a gallery of sample images per cluster;
stage-2 ROC curves and 2x2 confusion matrices per part; for a few-label run, the probe's
figures in their own table and its ROC curves (dashed, "few labels (F)") beside the label-free
ones; the skipped files; the resolved config.

It draws the metrics that :mod:`bonecluster.evaluate` computed and never imports it (evaluate
calls :func:`write_report`); :func:`comparison_table` is the same headline table as text, which
``bonecluster evaluate`` prints.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from bonecluster.data.cache import PreparedDataset
from bonecluster.checkpoint import read_metrics
from bonecluster.io import atomic_write_text
from bonecluster.metrics import contingency
from bonecluster.predict import ImagePrediction

GALLERY_PER_CLUSTER = 8
TSNE_MAX_POINTS = 2000


def write_report(run: str | Path, data: PreparedDataset, preds: list[ImagePrediction], metrics: dict,
                 out_html: str | Path, embeddings: np.ndarray | None = None, seed: int = 0,
                 few_preds: list[ImagePrediction] | None = None) -> Path:
    """Render the report for ``preds`` on ``data`` (aligned lists) into one HTML file.

    ``few_preds``: the few-label probe's predictions (aligned too), shown apart."""
    import matplotlib

    matplotlib.use("Agg")
    run = Path(run)
    sections = [
        ("Results", _metrics_section(metrics)),
        ("Stage 1: clusters against body parts", _stage1_confusion(data, preds)),
        ("Stage 1: training curves", _curves(run / "stage1" / "metrics.csv")),
        ("Stage 1: map of the embeddings (t-SNE)", _tsne(data, preds, embeddings, seed)),
        ("Stage 1: sample images per cluster", _gallery(data, preds)),
        ("Stage 2: ROC curves per body part", _roc(data, preds, few_preds, metrics)),
        ("Stage 2: confusion matrices at the label-free threshold", _stage2_confusion(data, preds)),
        *([("Stage 2: label-free checks of each part's score", _checks(metrics))]
          if "stage2_checks" in metrics else []),
        *([("Stage 2 with few labels (reported apart)", _few_labels(metrics))]
          if "stage2_few_labels" in metrics else []),
        (f"Skipped files ({len(data.skipped)})", _skipped(data)),
        ("Resolved config", f"<pre>{html.escape((run / 'config.yaml').read_text())}</pre>"
         if (run / "config.yaml").exists() else "<p>none</p>"),
    ]
    body = "\n".join(f"<section><h2>{html.escape(t)}</h2>\n{c}</section>" for t, c in sections)
    page = _PAGE.format(title=html.escape(f"bonecluster report: {run.name}"), body=body)
    return atomic_write_text(out_html, page)


# Published figures (percent). The preprint's "specificity" is TP/(TP+FP), i.e. precision, so it
# sits in the precision row; GNG-modified VGG's figures are reported as sensitivity/specificity.
PUBLISHED = {
    "preprint (DeepCluster)": {"stage1": {"sensitivity": 99.76, "precision": 99.53},
                               "stage2": {"sensitivity": 83.28, "precision": 97.56}},
    "GNG-modified VGG": {"stage1": {"sensitivity": 95.86, "specificity": 99.63},
                         "stage2": {"sensitivity": 92.50, "specificity": 92.12}},
}


def comparison_table(metrics: dict) -> str:
    """Our macro figures beside the published ones, as a fixed-width text table."""
    sources = list(PUBLISHED)
    lines = [f"{'':<24}{'ours':>8}" + "".join(f"{s:>26}" for s in sources)]
    for stage in ("stage1", "stage2"):
        ours = metrics.get(stage, {}).get("macro", {})
        keys = ("sensitivity", "specificity", "precision") + (("auroc", "kappa_study") if stage == "stage2" else ())
        for key in keys:
            mine = f"{100 * ours[key]:.2f}" if key in ours else "-"
            theirs = "".join(f"{PUBLISHED[s][stage].get(key, '-'):>26}" for s in sources)
            lines.append(f"{stage + ' ' + key:<24}{mine:>8}{theirs}")
    few = metrics.get("stage2_few_labels")
    if few:   # the few-label probe: its own rows, never mixed into the label-free ones
        for key in ("sensitivity", "specificity", "precision", "auroc", "kappa_study"):
            mine = f"{100 * few['macro'][key]:.2f}" if key in few.get("macro", {}) else "-"
            lines.append(f"{'few-label ' + key:<24}{mine:>8}" + "".join(f"{'-':>26}" for _ in sources))
        used = few.get("labels_used", {})
        lines.append(f"few-label rows: a probe fitted on {used.get('images', '?')} training images' labels "
                     f"({used.get('studies', '?')} studies, labels_fraction {few.get('labels_fraction')}); "
                     "flagged at the share of training images the probe flags at 0.5")
    lines.append("percent, macro over body parts; the preprint's 'specificity' is TP/(TP+FP) = precision")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sections


def _metrics_section(metrics: dict) -> str:
    s1 = metrics.get("stage1", {})
    head = ""
    if s1:
        head = (f"<p>Stage 1 on {s1['n_images']} labelled images: Hungarian accuracy "
                f"<b>{s1['accuracy_hungarian']:.3f}</b>, majority {s1['accuracy_majority']:.3f}, "
                f"NMI {s1['nmi']:.3f}, ARI {s1['ari']:.3f}.</p>")
    note = ("<p class=note>Labels were used only to score. Specificity is TN/(TN+FP); the preprint's "
            "'specificity' is TP/(TP+FP), which is precision, so it is shown in the precision row.</p>")
    return head + f"<pre>{html.escape(comparison_table(metrics))}</pre>" + note


def _stage1_confusion(data, preds) -> str:
    pairs = [(p.cluster, r.body_part) for p, r in zip(preds, data.records) if r.body_part and p.cluster is not None]
    if not pairs:
        return "<p>No stage-1 model in this run, or no body-part labels in this data.</p>"
    table, clusters, parts = contingency(*zip(*pairs))
    names = {p.cluster: p.cluster_name for p in preds}
    fig, ax = _figure(1.0 + 0.5 * len(parts), 1.0 + 0.45 * len(clusters))
    _heatmap(ax, table, [f"{c}: {names.get(c, c)}" for c in clusters], list(parts))
    ax.set_xlabel("body part (label)")
    ax.set_ylabel("stage-1 cluster: name")
    return _img(fig)


def _curves(metrics_csv: Path) -> str:
    if not metrics_csv.exists():
        return "<p>No training log.</p>"
    rows = read_metrics(metrics_csv)
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = _figure(9, 3, ncols=2)
    axes[0].plot(epochs, [float(r["loss"]) for r in rows], marker="o")
    axes[0].set(xlabel="epoch", ylabel="training loss", title="loss")
    lr = [(e, float(r["lr"])) for e, r in zip(epochs, rows) if r.get("lr")]
    if lr:   # the learning rate explains the loss's late rise, see CURVES_NOTE
        twin = axes[0].twinx()
        twin.plot(*zip(*lr), linestyle="--", color="tab:gray")
        twin.set_ylabel("learning rate (dashed)", color="tab:gray")
    nmi = [(e, float(r["nmi_prev"])) for e, r in zip(epochs, rows) if r["nmi_prev"] != ""]
    if nmi:
        axes[1].plot(*zip(*nmi), marker="o", color="tab:green")
    axes[1].set(xlabel="epoch", ylabel="NMI(t, t-1)", title="stability of the clusters", ylim=(0, 1))
    return _img(fig) + CURVES_NOTE


CURVES_NOTE = (
    "<p class='note'>Loss: cross-entropy on the epoch's pseudo-labels (DeepCluster epochs; SimCLR "
    "pre-training epochs, if any, show its contrastive loss). DeepCluster gives the classifier a fresh, "
    "random top layer every epoch, so when the learning rate has decayed close to 0 that layer can no "
    "longer be fitted and the loss rises in the last epochs, although the clusters no longer change "
    "(NMI near 1). NMI(t, t-1) compares each epoch's clusters with the previous epoch's: near 1 means "
    "the grouping has settled.</p>")


def _tsne(data, preds, embeddings, seed) -> str:
    if embeddings is None or len(embeddings) < 5:
        return "<p>No map: the run has no stage-1 model, or too few images.</p>"
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(embeddings), min(len(embeddings), TSNE_MAX_POINTS), replace=False))
    xy = TSNE(2, perplexity=min(30, len(idx) - 1), init="pca", random_state=seed).fit_transform(embeddings[idx])
    labels = [data.records[i].body_part or "unlabelled" for i in idx]
    fig, axes = _figure(11, 5, ncols=2)
    _scatter(axes[0], xy, [preds[i].cluster_name for i in idx], "coloured by stage-1 cluster")
    _scatter(axes[1], xy, labels, "coloured by body-part label")
    return _img(fig)


def _gallery(data, preds) -> str:
    images = data.images()
    rows = []
    for cluster in sorted({p.cluster for p in preds if p.cluster is not None}):
        members = [i for i, p in enumerate(preds) if p.cluster == cluster]
        picks = members[:: max(1, len(members) // GALLERY_PER_CLUSTER)][:GALLERY_PER_CLUSTER]
        thumbs = "".join(f"<img class=thumb src='{_png_data(images[i])}' title='{html.escape(data.records[i].path)}'>"
                         for i in picks)
        rows.append(f"<div class=row><div class=label>{cluster}: {html.escape(preds[members[0]].cluster_name)}"
                    f"<br><small>{len(members)} images</small></div>{thumbs}</div>")
    return "\n".join(rows)


def _roc(data, preds, few_preds=None, metrics=None) -> str:
    from sklearn.metrics import roc_curve

    by_part = _stage2_groups(data, preds)
    if not by_part:
        return "<p>No abnormality labels for any scored part.</p>"
    fig, ax = _figure(5, 5)
    colours = {}
    for part, (truth, scores, _) in by_part.items():
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, scores)
        colours[part] = ax.plot(fpr, tpr, label=part)[0].get_color()
    fraction = (metrics or {}).get("stage2_few_labels", {}).get("labels_fraction")
    for part, (truth, scores, _) in (_stage2_groups(data, few_preds) if few_preds else {}).items():
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, scores)
        ax.plot(fpr, tpr, ls="--", color=colours.get(part), label=f"{part} few labels ({fraction})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="sensitivity", title="image level")
    if ax.get_legend_handles_labels()[0]:  # parts with one class only have no curve
        ax.legend(fontsize=8)
    return _img(fig)


def _stage2_confusion(data, preds) -> str:
    by_part = _stage2_groups(data, preds)
    if not by_part:
        return "<p>No abnormality labels for any scored part.</p>"
    fig, axes = _figure(2.6 * len(by_part), 2.8, ncols=len(by_part))
    axes = np.atleast_1d(axes)
    for ax, (part, (truth, scores, threshold)) in zip(axes, by_part.items()):
        flags = scores >= threshold
        table = np.array([[np.sum(~truth & ~flags), np.sum(~truth & flags)],
                          [np.sum(truth & ~flags), np.sum(truth & flags)]])
        _heatmap(ax, table, ["normal", "abnormal"], ["flag: no", "flag: yes"])
        ax.set_title(part, fontsize=9)
    return _img(fig)


def _checks(metrics: dict) -> str:
    """One row per part: the training scores' framing and seed-agreement checks, and any warning."""
    def num(v):
        return "-" if v is None else f"{v:+.2f}"

    rows = "".join(
        f"<tr><td>{html.escape(part)}</td><td>{num(c.get('framing'))}</td><td>{num(c.get('seed_agreement'))}</td>"
        f"<td>{'<br>'.join(html.escape(w) for w in c.get('warnings', [])) or 'none'}</td></tr>"
        for part, c in metrics["stage2_checks"].items())
    return ("<table><tr><th>part</th><th>framing ρ</th><th>seed agreement ρ</th><th>warnings</th></tr>"
            f"{rows}</table><p class=note>Computed at training on the training films, without labels: the "
            "Spearman correlation of the score with how much of the frame each film fills (|ρ| ≥ 0.5 warns: the "
            "score may rank framing, not findings), and of the refined score with its kNN seed over the training "
            "studies (below 0 warns). See docs/stage2.md.</p>")


def _few_labels(metrics: dict) -> str:
    few = metrics["stage2_few_labels"]
    used = few.get("labels_used", {})
    keys = ("auroc", "sensitivity", "specificity", "precision", "kappa_study")
    head = "".join(f"<th>{k}</th>" for k in ("part", "images", "labels used (images / studies)", *keys))
    rows = []
    for part, m in {**few["per_part"], "macro": few["macro"]}.items():
        u = used.get("per_part", {}).get(part) if part != "macro" else used
        cells = [html.escape(part), str(m.get("n_images", "")),
                 f"{u['images']} / {u['studies']}" if u else ""]
        cells += [f"{m[k]:.3f}" if m.get(k) is not None else "-" for k in keys]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    note = (f"<p class=note>A logistic probe on the part model's features, fitted on the labels of "
            f"labels_fraction = {few.get('labels_fraction')} of each part's labelled training studies "
            "(and no other labels); its score mixes the probe's probability with the label-free score "
            "(stage2.probe_mix, 0 = the probability alone) and flags as many training images as "
            "probability &ge; 0.5 does. The label-free result above is "
            "unaffected. Dashed ROC curves above are the probe's.</p>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>" + note


def _skipped(data) -> str:
    if not data.skipped.items:
        return "<p>None.</p>"
    rows = "".join(f"<tr><td>{html.escape(s.path)}</td><td>{html.escape(s.reason)}</td></tr>" for s in data.skipped.items)
    return f"<table><tr><th>file</th><th>reason</th></tr>{rows}</table>"


# ----------------------------------------------------------------------------- helpers


def _stage2_groups(data, preds) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    groups: dict[str, list[int]] = {}
    for i, (p, r) in enumerate(zip(preds, data.records)):
        if p.score is not None and r.abnormal is not None:
            groups.setdefault(p.part, []).append(i)
    return {part: (data.abnormal(idx),
                   np.array([preds[i].score for i in idx], float), preds[idx[0]].threshold)
            for part, idx in sorted(groups.items())}


def _figure(w: float, h: float, ncols: int = 1):
    """(figure, axes): one axes object for ncols=1, else an array of them."""
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(w, h))


def _heatmap(ax, table: np.ndarray, row_labels, col_labels) -> None:
    ax.imshow(table, cmap="Blues")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    peak = table.max() if table.size else 0
    for (r, c), v in np.ndenumerate(table):
        ax.text(c, r, int(v), ha="center", va="center", fontsize=8, color="white" if v > peak / 2 else "black")


def _scatter(ax, xy: np.ndarray, groups: list[str], title: str) -> None:
    for g in sorted(set(groups)):
        m = np.array([x == g for x in groups])
        ax.scatter(xy[m, 0], xy[m, 1], s=6, label=g)
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend(fontsize=7, markerscale=2, loc="best")


def _img(fig) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _png_data(image_u8: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image_u8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; border-bottom: 1px solid #ccc; margin-top: 2em; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }}
.note {{ color: #555; font-size: 0.9em; }}
.row {{ display: flex; align-items: center; gap: 4px; margin: 4px 0; }}
.label {{ width: 140px; font-size: 0.9em; }}
.thumb {{ width: 72px; height: 72px; image-rendering: pixelated; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} td, th {{ border: 1px solid #ccc; padding: 3px 6px; }}
img {{ max-width: 100%; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""

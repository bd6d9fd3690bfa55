"""The ``bonecluster`` command: a thin layer over the Python API (one function per command)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from bonecluster import __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        print(f"error: {_describe(err)}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    from bonecluster.data import DataError
    from bonecluster.io import WriteError

    # OSError: a full disk, a read-only folder, a missing file... one line naming the path.
    return (DataError, WriteError, ValueError, OSError, RuntimeError)


def _describe(err: BaseException) -> str:
    """The error as one line; a bare OSError as ``PATH: reason`` (not ``[Errno N] ...``)."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def _setup_logging(verbose: bool) -> None:
    """Our messages at INFO (DEBUG with -v); other libraries' (faiss's loader...) only at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("bonecluster").setLevel(logging.DEBUG if verbose else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonecluster", description=(
        "Sort bone radiographs without labels: deep clustering into body parts (stage 1), "
        "then normal vs abnormal per part (stage 2)."))
    p.add_argument("--version", action="version", version=f"bonecluster {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    _add_phantom(sub)
    _add_pretrain_phantoms(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_name(sub)
    _add_demo(sub)
    _add_serve(sub)
    return p


def _add_config_options(p: argparse.ArgumentParser) -> None:
    from bonecluster.config import preset_names
    p.add_argument("--preset", default="cpu", help=f"config preset: {', '.join(preset_names())} (default cpu)")
    p.add_argument("--config", help="a YAML config file applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set data.size=96 (repeatable)")


def _load_config(args):
    from bonecluster.config import load_config

    return load_config(args.preset, args.config, args.overrides)


# Input-limit flags -> DataConfig fields (see DataConfig.LIMITS); each is sugar for --set data.FIELD=...
_LIMIT_FLAGS = (("max_pixels", "pixel_cap"), ("max_frames", "max_frames"), ("max_file_mb", "max_file_mb"),
                ("max_csv_row_chars", "max_csv_row_chars"))


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive {'integer' if kind is int else 'number'}, "
                                             f"got {text!r}")
        return value
    return parse


def _add_limit_options(p: argparse.ArgumentParser, default: str = "") -> None:
    """The input limits; over one, a file or CSV row is skipped with a warning naming it and the limit."""
    default = default or "default %s"
    g = p.add_argument_group("input limits", "a file or CSV row over a limit is skipped with a warning "
                             "naming it and the limit (flags win over --set data.FIELD=...)")
    g.add_argument("--max-pixels", type=_positive(int), metavar="N",
                   help="skip images with more than N pixels (width x height), checked before decoding; "
                        f"data.pixel_cap, {default % '64000000'}")
    g.add_argument("--max-frames", type=_positive(int), metavar="N",
                   help=f"skip DICOMs with more than N frames; data.max_frames, {default % '16'}")
    g.add_argument("--max-file-mb", type=_positive(float), metavar="MB",
                   help="skip files over MB megabytes (2^20 bytes) unread, and deflated DICOMs that inflate "
                        f"past it; data.max_file_mb, {default % '512'}")
    g.add_argument("--max-csv-row-chars", type=_positive(int), metavar="N",
                   help="skip CSV rows longer than N characters (a longer manifest header is an error); "
                        f"data.max_csv_row_chars, {default % '65536'}")


def _limit_values(args) -> dict:
    """The limit flags given, as {DataConfig field: value} for DataConfig.with_limits."""
    return {field: getattr(args, dest) for dest, field in _LIMIT_FLAGS if getattr(args, dest, None) is not None}


# ----------------------------------------------------------------------------- phantom


def _add_phantom(sub) -> None:
    p = sub.add_parser("phantom", help="write synthetic radiographs in MURA layout")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=1400, help="number of images (default 1400)")
    p.add_argument("--size", type=int, default=128, help="long side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.set_defaults(func=cmd_phantom)


def cmd_phantom(args) -> int:
    from bonecluster.data.phantoms import generate_phantoms

    s = generate_phantoms(args.out, n=args.n, size=args.size, seed=args.seed, workers=args.workers)
    print(f"wrote {s.n_images} images in {s.n_studies} studies "
          f"({s.n_abnormal_studies} abnormal) to {s.out} in {s.seconds:.1f} s")
    return 0


def _add_pretrain_phantoms(sub) -> None:
    p = sub.add_parser("pretrain-phantoms",
                       help="pre-train a backbone on labelled phantoms (part, view, finding); start runs from it "
                            "with --set model.weights=FILE")
    p.add_argument("--out", required=True, help="weights file to write (FILE, plus FILE.json with the settings "
                                                "and the per-task accuracy on other phantoms)")
    p.add_argument("--films", type=_positive(int), help="phantom films to train on (phantoms.films; default 20000)")
    p.add_argument("--epochs", type=_positive(int), help="passes over them (phantoms.epochs; default 3)")
    p.add_argument("--adapt-to", nargs="+", metavar="DATA",
                   help="unlabelled real films to adapt the network to, domain-adversarially (" + DATA_HELP
                        + "); sets phantoms.adapt=1 unless the config gives another weight; labels are never read")
    p.add_argument("--cache", metavar="DIR", help="keep the decoded --adapt-to films here (default: data.cache if set, "
                                                  "else a temporary folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_options(p)
    p.set_defaults(func=cmd_pretrain_phantoms)


def cmd_pretrain_phantoms(args) -> int:
    from bonecluster.phantom_pretrain import pretrain_on_phantoms

    for key, value in (("films", args.films), ("epochs", args.epochs)):
        if value is not None:
            args.overrides.append(f"phantoms.{key}={value}")
    cfg = _load_config(args)
    if args.adapt_to and cfg.phantoms.adapt == 0:
        if any(o.startswith("phantoms.adapt=") for o in args.overrides):
            raise SystemExit("--adapt-to gives films to adapt to, but --set phantoms.adapt=0 switches adaptation off")
        args.overrides.append("phantoms.adapt=1")
        cfg = _load_config(args)
    if cfg.phantoms.adapt > 0 and not args.adapt_to:
        raise SystemExit(f"phantoms.adapt={cfg.phantoms.adapt} needs real films to adapt to: give --adapt-to DATA")
    real_films = None
    if args.adapt_to:   # adapt > 0 here: the checks above leave no other case
        with tempfile.TemporaryDirectory(prefix="bonecluster-adapt-") as scratch:
            real_films = _adapt_films(args, cfg, scratch)   # in memory: the scratch cache may go
    result = pretrain_on_phantoms(cfg, args.out, progress=not args.quiet, real_films=real_films)
    last = result.history[-1] if result.history else {}
    scores = ", ".join(f"{k[6:-9]} {v:.3f}" for k, v in last.items() if k.startswith("valid_"))
    print(f"pre-trained on {cfg.phantoms.films} phantoms x {cfg.phantoms.epochs} epochs in {result.seconds:.0f} s"
          + (f"; accuracy on other phantoms: {scores}" if scores else ""))
    print(f"weights: {result.weights} (use --set model.weights={result.weights})")
    return 0


def _adapt_films(args, cfg, scratch: str):
    """The --adapt-to films decoded at the config's data settings (skipped files reported), in
    memory: uint8 ``(N, S, S)``."""
    import numpy as np

    from bonecluster.data import prepare_sources

    data = prepare_sources(args.adapt_to, cfg.data, cache=args.cache or cfg.data.cache or scratch,
                           progress=not args.quiet)
    if data.skipped:
        print(f"--adapt-to: {len(data.skipped)} files skipped (unreadable or too large)", file=sys.stderr)
    print(f"adapting to {len(data.records)} real films (no labels read)")
    return np.asarray(data.images())


# ----------------------------------------------------------------------------- prepare


DATA_HELP = ("MURA root, CSV manifest, folder of images/DICOMs, or a PACS over DICOMweb: "
             "dicomweb+http://HOST:PORT/dicom-web[?Attr=value&...] (docs/pacs.md)")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="decode every image once into a memory-mapped cache")
    p.add_argument("data", nargs="+", help=DATA_HELP)
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--size", type=int, help="square side in pixels (default: the preset's; 0: the backbone's own)")
    p.add_argument("--fit", choices=["squash", "letterbox", "deskew", "crop"],
                   help="how to make images square (deskew: straighten a tilted film, crop, letterbox; "
                        "crop: cut to the film's box, squash)")
    p.add_argument("--workers", type=int, help="decoding processes (default: one per core)")
    _add_config_options(p)
    _add_limit_options(p)
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    from bonecluster.config import apply_override, resolve_size
    from bonecluster.data import prepare_sources, write_skipped_csv

    cfg = _load_config(args)
    cfg.data = cfg.data.with_limits(**_limit_values(args))  # the flags win over --set; all limits checked
    for key, value in (("size", args.size), ("fit", args.fit), ("workers", args.workers)):
        if value is not None:
            cfg = apply_override(cfg, f"data.{key}={value}")
    cfg = resolve_size(cfg)   # --size 0: the backbone's own
    ds = prepare_sources(args.data, cfg.data, cache=args.out)
    out = Path(args.out)
    ds.save(out / "dataset.json")
    write_skipped_csv(out / "skipped.csv", ds.skipped)
    _print_prepare_summary(ds)
    return 0


def _print_prepare_summary(ds) -> None:
    s = ds.summary()
    print(f"prepared {s['images']} images at {s['size']} px ({s['decoded']} decoded, "
          f"{s['reused']} from cache), skipped {s['skipped']}, in {s['seconds']:.1f} s")
    print(f"cache: {s['store']}")


# ----------------------------------------------------------------------------- train


def _method_help() -> str:
    from bonecluster.methods import DEFAULT, available

    summaries = "; ".join(f"{name} = {summary.rstrip('.')}" for name, summary in available().items())
    return f"clustering method (config key `method`; default {DEFAULT}, the paper's): {summaries}"


def _add_train(sub) -> None:
    from bonecluster.methods import method_names

    p = sub.add_parser("train", help="deep-cluster the images: stage 1 body parts, stage 2 abnormality")
    p.add_argument("data", nargs="+", help=DATA_HELP)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--stages", default="1,2", help="comma-separated stages to train (default 1,2)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--method", choices=method_names(), help=_method_help())
    p.add_argument("--labels-fraction", type=float, metavar="F",
                   help="few-label mode: stage 2 also fits a probe on the labels of this fraction of each "
                        "part's labelled training studies, reported apart (stage2.labels_fraction; default 0 = off)")
    _add_config_options(p)
    _add_limit_options(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from bonecluster.pipeline import train

    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    # The flags are overrides applied last, after any --set.
    if args.method:
        args.overrides.append(f"method={args.method}")
    if args.labels_fraction is not None:
        args.overrides.append(f"stage2.labels_fraction={args.labels_fraction}")
    cfg = _load_config(args)
    cfg.data = cfg.data.with_limits(**_limit_values(args))  # the flags win over --set; all limits checked
    summary = train(args.data, args.out, cfg, stages=stages, resume=args.resume, progress=not args.quiet)
    if summary["is_main"]:  # under torchrun only rank 0 reports
        if "stage1" in summary:
            _print_stage1(summary["stage1"])
        if "stage2" in summary:
            _print_stage2(summary["stage2"])
        print(f"skipped files: {summary['skipped_files']}; run folder: {args.out}")
    return 0


def _print_stage2(parts: dict) -> None:
    print(f"stage 2: {len(parts)} body part model(s)")
    for part, s in parts.items():
        print(f"  {part:<10} {s['n_images']:>6} images  threshold {s['threshold']:.4f} ({s['threshold_method']})"
              f"  flagged {s['flagged_share']:.0%} of training images")
        if "few_labels" in s:
            f = s["few_labels"]
            print(f"  {'':<10} few-label probe on {f['images']} labelled images ({f['studies']} of "
                  f"{f['labelled_studies']} labelled studies)")


def _print_stage1(s: dict) -> None:
    flag = "  (stopped early: clusters collapsed)" if s["collapsed"] else ""
    print(f"stage 1: {s['n_images']} images, k={s['k']}, {s['epochs_run']} epochs in {s['seconds']:.0f} s{flag}")
    print("cluster sizes: " + " ".join(str(x) for x in s["cluster_sizes"]))
    if "scored_on_labels" in s:
        m = s["scored_on_labels"]
        print(f"scored on {m['n_labelled']} labelled images (labels not used in training): "
              f"Hungarian accuracy {m['accuracy_hungarian']:.3f}, NMI {m['nmi']:.3f}, ARI {m['ari']:.3f}")


# ----------------------------------------------------------------------------- evaluate


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a run against labelled data (metrics.json)")
    p.add_argument("run", help="run folder")
    p.add_argument("data", nargs="+", help="labelled data: MURA root or CSV manifest (or a DICOMweb source: "
                                           "body parts from BodyPartExamined)")
    p.add_argument("--json", help="where to write the metrics (default RUN/metrics.json)")
    p.add_argument("--report", metavar="DIR", help="also write DIR/report.html (self-contained, opens offline)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_limit_options(p, default="default: the run's (%s unless changed)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from bonecluster.evaluate import evaluate
    from bonecluster.report import comparison_table

    metrics = evaluate(args.run, args.data, args.json, args.report, progress=not args.quiet,
                       limits=_limit_values(args))
    _print_metrics(metrics)
    print(comparison_table(metrics))
    print(f"skipped files: {metrics['skipped_files']}; metrics: {args.json or Path(args.run) / 'metrics.json'}")
    if args.report:
        print(f"report: {Path(args.report) / 'report.html'}")
    return 0


def _print_metrics(metrics: dict) -> None:
    s1 = metrics.get("stage1")
    if s1:
        print(f"stage 1 on {s1['n_images']} labelled images: Hungarian accuracy {s1['accuracy_hungarian']:.3f}, "
              f"majority {s1['accuracy_majority']:.3f}, NMI {s1['nmi']:.3f}, ARI {s1['ari']:.3f}")
    for part, m in metrics.get("stage2", {}).get("per_part", {}).items():
        auc = f"{m['auroc']:.3f}" if "auroc" in m else "-"
        print(f"stage 2 {part:<9} {m['n_images']:>6} images {m['n_studies']:>5} studies  AUROC {auc}")


# ----------------------------------------------------------------------------- predict


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="cluster, body part and abnormality of new images (json or csv)")
    p.add_argument("run", help="run folder")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image or DICOM files, folders (searched recursively), MURA roots, CSV manifests "
                        "or DICOMweb sources (dicomweb+http://HOST:PORT/dicom-web?Attr=value)")
    p.add_argument("--format", dest="out_format", choices=["json", "csv"], default="json",
                   help="json (default: images, studies and skipped files) or csv (one row per image)")
    p.add_argument("--out", metavar="FILE", help="write here (atomically) instead of to stdout")
    p.add_argument("--cache", metavar="DIR", help="keep decoded images here for reuse (default: a temp folder)")
    p.add_argument("--parts-from-clusters", action="store_true",
                   help="score stage 2 with the stage-1 cluster name even where the metadata has a body part")
    p.add_argument("--store", action="store_true",
                   help="send each study's result back to the DICOMweb input it came from, as a DICOM "
                        "Structured Report in a new series of the same study (docs/pacs.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_limit_options(p, default="default: the run's (%s unless changed)")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from bonecluster.io import atomic_write_text
    from bonecluster.predict import predict_paths

    report = predict_paths(args.run, args.inputs, progress=not args.quiet, cache=args.cache,
                           use_metadata_parts=not args.parts_from_clusters, limits=_limit_values(args),
                           store=args.store)
    text = report.render(args.out_format)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    s = report.summary()
    print(f"predicted {s['images']} images ({s['abnormal_images']} flagged abnormal), {s['studies']} studies "
          f"({s['abnormal_studies']} flagged), skipped {s['skipped']} file(s)"
          + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    if report.stored:
        print(f"stored {s['reports_stored']} report(s) in the PACS, {s['reports_not_stored']} refused"
              + "".join(f"\n  not stored: study {r.study}: {r.reason}" for r in report.stored if not r.stored),
              file=sys.stderr)
    for item in report.skipped[:20]:
        print(f"  skipped {item.path}: {item.reason}", file=sys.stderr)
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more (all listed under \"skipped\" in the json output)",
              file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- export


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the run's models as ONNX (with manifest.json)")
    p.add_argument("run", help="run folder")
    p.add_argument("--format", dest="out_format", choices=["onnx"], default="onnx", help="onnx (the only one)")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN/onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--part", dest="parts", action="append", metavar="PART",
                   help="export only this stage-2 body part (repeatable; default all)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto",
                   help="torch.onnx exporter: dynamo, legacy (TorchScript), auto (dynamo, else legacy)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from bonecluster.export import export_onnx

    paths = export_onnx(args.run, args.out, opset=args.opset, parts=args.parts, exporter=args.exporter)
    for path in paths:
        print(path)
    return 0


# ----------------------------------------------------------------------------- name


def _add_name(sub) -> None:
    p = sub.add_parser("name", help="name stage-1 clusters (kept in RUN/stage1/names.json)",
                       description="Name one cluster (--cluster N --as NAME), or every cluster from a few labelled "
                                   "films each (--from DATA --per-cluster M: the M films of DATA in the cluster "
                                   "nearest its centroid, by majority; audit in RUN/stage1/naming.json).")
    p.add_argument("run", help="run folder")
    p.add_argument("--cluster", type=int, help="cluster id")
    p.add_argument("--as", dest="name", help="the new name, e.g. WRIST")
    p.add_argument("--from", dest="labelled", nargs="+", metavar="DATA",
                   help="labelled films (folders, MURA trees, manifests) to name every cluster from")
    p.add_argument("--per-cluster", type=int, metavar="M",
                   help="with --from: labelled films looked at per cluster (default 5)")
    p.add_argument("--eval", dest="evaluation", nargs="+", metavar="DATA", default=[],
                   help="the data the names will be scored on: --from sharing a film or study with it is refused")
    p.add_argument("--cache", help="keep the decoded --from films here (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_name)


def cmd_name(args) -> int:
    from bonecluster.names import name_cluster
    from bonecluster.naming import name_clusters

    if args.labelled:
        if args.cluster is not None or args.name is not None:
            raise ValueError("give either --from DATA (name every cluster) or --cluster N --as NAME, not both")
        per_cluster = 5 if args.per_cluster is None else args.per_cluster
        audit = name_clusters(args.run, args.labelled, per_cluster, args.evaluation, cache=args.cache,
                              progress=not args.quiet)
        for c, n in sorted(audit.clusters.items()):
            votes = ", ".join(f"{p} {v}" for p, v in sorted(n.votes.items(), key=lambda kv: -kv[1])) or "no labelled film"
            print(f"cluster {c}: {n.name} ({votes})")
        print(f"named {audit.n_names} of {len(audit.clusters)} clusters from {audit.n_labels_read} labelled films "
              f"(audit: {args.run}/stage1/naming.json)")
        return 0
    if args.cluster is None or args.name is None:
        raise ValueError("give --cluster N --as NAME, or --from DATA to name every cluster")
    if args.per_cluster is not None or args.evaluation or args.cache:
        raise ValueError("--per-cluster, --eval and --cache go with --from, not with --cluster N --as NAME")
    names = name_cluster(args.run, args.cluster, args.name)
    print("stage-1 clusters: " + ", ".join(f"{k}={v}" for k, v in sorted(names.items())))
    return 0


# ----------------------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on built-in synthetic data")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--n", type=int, default=1400, help="phantom images (default 1400)")
    p.add_argument("--seed", type=int, default=0)
    _add_config_options(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from bonecluster.demo import DEMO_OVERRIDES, run_demo, summary_screen

    args.overrides[:0] = DEMO_OVERRIDES
    print(f"demo settings (before --set): {' '.join(DEMO_OVERRIDES)}")
    summary = run_demo(args.out, _load_config(args), n=args.n, seed=args.seed)
    _print_stage1(summary["stage1"])
    _print_stage2(summary["stage2"])
    print("\nevaluation on held-out phantoms (labels used only to score):")
    _print_metrics(summary["metrics"])
    print(summary_screen(summary))
    return 0


# ----------------------------------------------------------------------------- serve


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="web viewer: upload a radiograph, browse and name the clusters")
    p.add_argument("run", help="run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=50, help="largest upload in MB (default 50)")
    p.add_argument("--max-decodes", type=_positive(int), default=2, metavar="N",
                   help="uploads decoded at once; more wait their turn (default 2)")
    p.add_argument("--max-pixels", type=_positive(int), metavar="N",
                   help="refuse uploads with more than N pixels (width x height), checked before decoding; "
                        "default: the run's data.pixel_cap")
    p.add_argument("--max-frames", type=_positive(int), metavar="N",
                   help="refuse DICOM uploads with more than N frames; default: the run's data.max_frames")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from bonecluster.serve import serve

    serve(args.run, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
          max_decodes=args.max_decodes, limits=_limit_values(args))
    return 0

"""`bonecluster train --stages 1` end to end on tiny phantoms."""

from __future__ import annotations

import json

import pytest

from bonecluster.cli import main
from bonecluster.data.phantoms import generate_phantoms
from tests.integration.test_engine import TINY

SETS = [a for s in TINY + ["train.epochs=2"] for a in ("--set", s)]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    generate_phantoms(root / "ph", n=42, size=64, seed=5, progress=False, workers=1)
    return root / "ph"


def test_train_stage1_writes_a_complete_run_folder(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(phantoms), "--out", str(run), "--stages", "1", "--quiet", *SETS]) == 0
    out = capsys.readouterr().out
    assert "stage 2" not in out
    assert "stage 1: 42 images, k=7, 2 epochs" in out
    assert "Hungarian accuracy" in out and "labels not used in training" in out
    for name in ("config.yaml", "data.json", "skipped.csv", "stage1/model.pt", "stage1/checkpoint.pt",
                 "stage1/metrics.csv", "stage1/config.yaml", "stage1/summary.json"):
        assert (run / name).is_file(), name
    assert main(["name", str(run), "--cluster", "3", "--as", "Left wrist"]) == 0
    assert json.loads((run / "stage1" / "names.json").read_text())["3"] == "Left wrist"
    assert main(["name", str(run), "--cluster", "99", "--as", "X"]) == 1
    assert main(["name", str(run), "--cluster", "1", "--as", "../etc"]) == 1
    summary = json.loads((run / "stage1" / "summary.json").read_text())
    assert sum(summary["cluster_sizes"]) == 42
    assert 0 <= summary["scored_on_labels"]["accuracy_hungarian"] <= 1
    # a finished run resumes to the same end without training again
    assert main(["train", str(phantoms), "--out", str(run), "--stages", "1", "--resume", "--quiet", *SETS]) == 0
    assert json.loads((run / "stage1" / "summary.json").read_text())["cluster_sizes"] == summary["cluster_sizes"]


S2 = ["--set", "stage2.k=2", "--set", "stage2.epochs=1", "--set", "stage2.min_images=4"]


def test_train_both_stages_writes_one_model_per_part(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(phantoms), "--out", str(run), "--quiet", *SETS, *S2]) == 0
    out = capsys.readouterr().out
    assert "stage 2: 7 body part model(s)" in out
    parts = json.loads((run / "stage2" / "summary.json").read_text())
    assert sorted(parts) == ["ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST"]
    assert sum(p["n_images"] for p in parts.values()) == 42
    for part in parts:
        assert (run / "stage2" / part / "anomaly.pt").is_file()
    names = json.loads((run / "stage1" / "names.json").read_text())
    assert len(names) == 7 and set(names.values()) <= set(parts) | {f"cluster-{i}" for i in range(7)}


def test_stage2_alone_on_unlabelled_folder_needs_stage1(tmp_path, capsys):
    from tests.conftest import write_png

    for i in range(12):
        write_png(tmp_path / "d" / f"{i}.png", seed=i)
    assert main(["train", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--stages", "2", *SETS]) == 1
    assert "train stage 1 first" in capsys.readouterr().err


def test_bad_override_names_the_key(phantoms, tmp_path, capsys):
    assert main(["train", str(phantoms), "--out", str(tmp_path / "r"), "--set", "train.epoch=3"]) == 1
    assert "train.epoch" in capsys.readouterr().err


def test_resume_without_checkpoint_fails_clearly(phantoms, tmp_path, capsys):
    assert main(["train", str(phantoms), "--out", str(tmp_path / "r"), "--stages", "1", "--resume", "--quiet",
                 *SETS]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_demo_runs_end_to_end_small(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n", "28", *SETS, *S2]) == 0
    out = capsys.readouterr().out
    assert "stage 1: 28 images, k=7" in out and "Hungarian accuracy" in out
    assert "stage 2: 7 body part model(s)" in out
    assert "evaluation on held-out phantoms" in out and "preprint (DeepCluster)" in out
    assert (tmp_path / "demo" / "demo.json").is_file()
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["stage1"]["n_images"] == 7  # the held-out set: n // 4, at least 7
    # the summary screen: figures beside the yardstick, the phase table, the report, the next command
    assert "supervised HOG" in out and f"report:  {tmp_path / 'demo' / 'report.html'}" in out
    assert f"next:    bonecluster serve {tmp_path / 'demo'}" in out
    demo = json.loads((tmp_path / "demo" / "demo.json").read_text())
    phases = [r["phase"] for r in demo["phases"]]
    assert phases[:3] == ["phantoms", "decoding", "stage 1"] and phases[-3:] == ["evaluation", "report",
                                                                                   "supervised yardstick"]
    assert [p for p in phases if p.startswith("stage 2 ")] == [f"stage 2 {p}" for p in sorted(demo["stage2"])]
    stage1 = demo["phases"][2]
    assert {"feature pass", "BN pass", "k-means", "training"} <= set(stage1["inside"])
    assert sum(r["seconds"] for r in demo["phases"]) <= demo["seconds"] + 0.1
    for line in ("stage 1", "  training", "stage 2 HAND", "evaluation", "total"):
        assert any(row.startswith(line) for row in out.splitlines()), line


def test_evaluate_writes_the_documented_metrics_schema(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(phantoms), "--out", str(run), "--quiet", *SETS, *S2]) == 0
    assert main(["evaluate", str(run), str(phantoms), "--json", str(tmp_path / "m.json"), "--quiet",
                 "--report", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "preprint (DeepCluster)" in out and "= precision" in out
    page = (tmp_path / "rep" / "report.html").read_text()
    for title in ("clusters against body parts", "training curves", "t-SNE", "sample images per cluster",
                  "ROC curves", "confusion matrices", "Skipped files", "Resolved config"):
        assert title in page, title
    assert "fresh, random top layer" in page   # the curves say why the loss rises at the end
    assert page.count("data:image/png;base64,") >= 5 + 7  # five figures, a thumbnail or more per cluster
    assert "http://" not in page and "https://" not in page  # opens offline
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m) == {"stage1", "stage2", "stage2_checks", "skipped_files"}
    # every part's label-free checks, as training stored them, in the metrics and in the report
    assert set(m["stage2_checks"]) == set(m["stage2"]["per_part"])
    for c in m["stage2_checks"].values():
        assert set(c) == {"seed_agreement", "framing", "warnings"} and -1 <= c["framing"] <= 1
    assert "label-free checks of each part" in page and "framing ρ" in page
    assert set(m["stage1"]) == {"n_images", "accuracy_hungarian", "accuracy_majority", "accuracy_named", "nmi", "ari",
                                "per_part", "macro", "n_names", "n_labels_read"}
    assert m["stage1"]["n_labels_read"] == 42   # the default names read every training film's part
    assert m["stage1"]["n_images"] == 42 and set(m["stage1"]["macro"]) <= {"sensitivity", "specificity", "precision"}
    assert set(m["stage2"]) == {"per_part", "macro"}
    for part, row in m["stage2"]["per_part"].items():
        assert set(row) <= {"n_images", "n_studies", "auroc", "sensitivity", "specificity", "precision",
                            "kappa_study"}
        assert {"n_images", "n_studies"} <= set(row)
    assert sum(r["n_images"] for r in m["stage2"]["per_part"].values()) == 42

    def values(d):
        for v in d.values():
            yield from values(v) if isinstance(v, dict) else [v]

    floats = [v for v in values({k: v for k, v in m.items() if k != "skipped_files"}) if isinstance(v, float)]
    assert floats and all(-1 <= v <= 1 for v in floats)  # fractions (ARI and kappa may dip below 0)


def test_stage2_only_run_evaluates_on_metadata_parts(phantoms, tmp_path, capsys):
    """Like MURA humerus: every record has its part, so stage 2 needs no stage-1 model."""
    run = tmp_path / "run"
    assert main(["train", str(phantoms), "--out", str(run), "--stages", "2", "--quiet", *SETS, *S2]) == 0
    assert not (run / "stage1").exists()
    assert main(["evaluate", str(run), str(phantoms), "--json", str(tmp_path / "m.json"), "--quiet",
                 "--report", str(tmp_path / "rep")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert "stage1" not in m and sum(r["n_images"] for r in m["stage2"]["per_part"].values()) == 42
    assert "no stage-1 model" in (tmp_path / "rep" / "report.html").read_text()

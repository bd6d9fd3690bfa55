"""Few-label mode end to end: `train --labels-fraction`, the audited probe, and its own metrics block."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from bonecluster.cli import main
from bonecluster.config import config_from_dict, read_yaml
from bonecluster.data import PreparedDataset
from bonecluster.checkpoint import TrainedClusters
from bonecluster.stage2.fewlabel import PROBE
from bonecluster.stage2.parts import group_by_part
from bonecluster.stage2.scoring import ANOMALY, PartAnomaly
from bonecluster.stage2.fewlabel import FewLabelProbe, train_part_probe
from tests.integration.conftest import train_stage2_only

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stage 2 alone on 168 phantoms (about 8 studies per part), the labels of 20% of the studies."""
    return train_stage2_only(tmp_path_factory.mktemp("few"), "--labels-fraction", "0.2")


def test_probe_files_audit_exactly_the_fraction(run):
    cfg = config_from_dict(read_yaml(run / "run" / "config.yaml"))
    assert cfg.stage2.labels_fraction == 0.2
    data = PreparedDataset.load(run / "run" / "data.json")
    summary = json.loads((run / "run" / "stage2" / "summary.json").read_text())
    probes = 0
    for part, positions in group_by_part(data).items():
        path = run / "run" / "stage2" / part / PROBE
        if not path.exists():
            continue
        probes += 1
        raw = torch.load(path, weights_only=True)   # plain tensors and values, no pickled classes
        probe = FewLabelProbe.load(path)
        records = [data.records[i] for i in positions]
        studies = {r.study for r in records if r.abnormal is not None}
        assert probe.n_labelled_studies == len(studies)
        assert probe.n_studies == int(np.floor(0.2 * len(studies) + 0.5)) == len({records[i].study
                                                                                  for i in probe.label_positions})
        assert len(raw["label_positions"]) == probe.n_labels == len(probe.label_paths)
        assert [records[i].path for i in probe.label_positions] == probe.label_paths
        # every image of a picked study, no other
        assert probe.n_labels == sum(r.study in {records[i].study for i in probe.label_positions} for r in records)
        assert summary[part]["few_labels"]["images"] == probe.n_labels
        # self-trained once per default share (0.3 to 0.7), one model row each
        assert summary[part]["few_labels"]["pseudo_shares"] == [0.3, 0.4, 0.5, 0.6, 0.7]
        assert probe.coef.shape[0] == 5 == len(probe.intercept)
        # the default few-label score mixes in the label-free score, and its threshold flags as
        # many training images as the probe's own 0.5 does (more only where scores tie with the
        # threshold: mixed percentiles of ranks can tie)
        assert summary[part]["few_labels"]["mix"] == 0.25 == probe.mix
        assert len(probe.train_probabilities) == len(probe.train_unsupervised) == len(positions)
        scores = probe.mixed(probe.train_probabilities, probe.train_unsupervised)
        wanted = int((probe.train_probabilities >= 0.5).sum())
        assert int((scores > probe.threshold).sum()) <= wanted <= int((scores >= probe.threshold).sum())
        assert int((scores >= probe.threshold).sum()) - wanted <= int((scores == probe.threshold).sum()) - 1
    assert probes >= 5   # a part whose pick holds one class only is skipped with a warning


def test_labels_outside_the_pick_do_not_change_the_probe(run):
    """Refit one part's probe with every label outside its audited subset flipped: same probe."""
    cfg = config_from_dict(read_yaml(run / "run" / "config.yaml"))
    data = PreparedDataset.load(run / "run" / "data.json")
    # a part whose first random pick held both classes, so no label beyond the pick was read
    # (otherwise the walk to the other class reads n_seen - n_studies more, see choose_label_subset)
    part, positions = next((p, pos) for p, pos in group_by_part(data).items()
                           if (run / "run" / "stage2" / p / PROBE).exists()
                           and FewLabelProbe.load(run / "run" / "stage2" / p / PROBE).n_seen
                           == FewLabelProbe.load(run / "run" / "stage2" / p / PROBE).n_studies)
    folder = run / "run" / "stage2" / part
    saved = FewLabelProbe.load(folder / PROBE)
    subset = data.subset(positions)
    used = {subset.records[i].study for i in saved.label_positions}
    flipped = replace(subset, records=[r if r.study in used else replace(r, abnormal=not r.abnormal)
                                       for r in subset.records])
    trained, anomaly = TrainedClusters.load(folder), PartAnomaly.load(folder / ANOMALY)
    again = train_part_probe(trained, flipped, anomaly, cfg.stage2, part, batch_size=cfg.train.feature_batch_size)
    assert again.label_positions == saved.label_positions
    assert torch.allclose(again.coef, saved.coef, atol=1e-6) and torch.allclose(again.intercept, saved.intercept)


def test_evaluate_reports_few_labels_apart(run, capsys):
    out = run / "out"
    assert main(["evaluate", str(run / "run"), str(run / "ph" / "valid"), "--json", str(out / "m.json"),
                 "--quiet", "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "few-label auroc" in printed
    m = json.loads((out / "m.json").read_text())
    assert set(m) == {"stage2", "stage2_checks", "stage2_few_labels", "skipped_files"}
    few, s2 = m["stage2_few_labels"], m["stage2"]
    assert set(s2) == {"per_part", "macro"}
    assert set(few) == {"per_part", "macro", "labels_fraction", "labels_used"} and few["labels_fraction"] == 0.2
    assert few["labels_used"]["images"] == sum(p["images"] for p in few["labels_used"]["per_part"].values()) > 0
    assert set(few["per_part"]) == set(few["labels_used"]["per_part"])
    for row in few["per_part"].values():
        assert set(row) <= {"n_images", "n_studies", "auroc", "sensitivity", "specificity", "precision",
                            "kappa_study"}
        assert all(0 <= v <= 1 for k, v in row.items() if k not in ("n_images", "n_studies", "kappa_study"))
    assert all(0 <= v <= 1 for k, v in few["macro"].items() if k != "kappa_study")
    page = (out / "report.html").read_text()
    assert "Stage 2 with few labels" in page and "labels_fraction = 0.2" in page
    # the label-free block is the same with the probes gone
    for probe in (run / "run" / "stage2").glob(f"*/{PROBE}"):
        probe.rename(probe.with_suffix(".bak"))
    try:
        assert main(["evaluate", str(run / "run"), str(run / "ph" / "valid"), "--json", str(out / "m0.json"),
                     "--quiet"]) == 0
    finally:
        for probe in (run / "run" / "stage2").glob("*/probe.bak"):
            probe.rename(probe.with_suffix(".pt"))
    m0 = json.loads((out / "m0.json").read_text())
    assert "stage2_few_labels" not in m0 and m0["stage2"] == s2


def test_a_bad_pseudo_share_fails_before_training(run, tmp_path, capsys):
    from tests.integration.conftest import STAGE2_SETS

    for bad in ("stage2.probe_pseudo_share=1.5", "stage2.probe_pseudo_share=half", "stage2.probe_mix=1.5"):
        sets = [a for s in STAGE2_SETS + [bad] for a in ("--set", s)]
        assert main(["train", str(run / "ph" / "train"), "--out", str(tmp_path / "r"), "--stages", "2",
                     "--labels-fraction", "0.2", "--quiet", *sets]) != 0
        assert bad.split("=")[0].split(".")[1] in capsys.readouterr().err
        assert not (tmp_path / "r" / "stage2").exists()


def test_few_label_predictions_use_each_probes_threshold(run):
    from bonecluster.data import prepare_sources
    from bonecluster.evaluate import few_label_predictions
    from bonecluster.predict import Predictor

    cfg = config_from_dict(read_yaml(run / "run" / "config.yaml"))
    data = prepare_sources([run / "ph" / "valid"], cfg.data, cache=run / "run" / "cache", progress=False)
    predictor = Predictor(run / "run")
    few, probes = few_label_predictions(predictor, data, predictor.predict(data))
    scored = [p for p in few if p.score is not None]
    assert scored and {p.part for p in scored} <= set(probes)
    for p in scored:
        threshold = probes[p.part].threshold
        assert probes[p.part].mix == 0.25 and p.threshold == threshold and p.abnormal == (p.score >= threshold)
        assert 0.0 <= p.score <= 1.0

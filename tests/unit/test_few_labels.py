"""Few-label mode: which training labels the probe may use, and the probe itself."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bonecluster.data.records import Record
from bonecluster.stage2.fewlabel import (FewLabelProbe, LabelSubset, choose_label_subset, fit_probe,
                                         labels_to_choose, parse_probe_features)


def _records(n_studies=40, views=2, abnormal_every=3, unlabelled=0):
    recs = [Record(f"s{s}/i{v}.png", study=f"s{s}", abnormal=(s % abnormal_every == 0))
            for s in range(n_studies) for v in range(views)]
    recs += [Record(f"u{i}.png", study=f"u{i}") for i in range(unlabelled)]   # no label
    return recs


def test_counts_are_exact_and_whole_studies():
    recs = _records(n_studies=40, views=2, unlabelled=10)
    for fraction, studies in ((0.05, 2), (0.1, 4), (0.2, 8), (0.5, 20), (1.0, 40), (0.0125, 1)):
        sub = choose_label_subset(recs, fraction, seed=0)
        assert len(sub.studies) == studies == labels_to_choose(fraction, 40)
        assert sub.n_images == 2 * studies and sub.n_labelled_studies == 40 and sub.n_labelled_images == 80
        assert all(recs[i].abnormal is not None for i in sub.positions)  # unlabelled images never picked
        assert {recs[i].study for i in sub.positions} == set(sub.studies)  # every view of a picked study
    assert labels_to_choose(0.05, 30) == 2 and labels_to_choose(0.05, 10) == 1  # halves round up


def test_fraction_zero_picks_nothing_and_bad_fractions_fail():
    sub = choose_label_subset(_records(), 0.0)
    assert sub.n_images == 0 and sub.studies == [] and sub.n_seen == 0
    assert choose_label_subset([Record("a.png")], 0.5).n_images == 0  # no labelled study at all
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="labels_fraction"):
            choose_label_subset(_records(), bad)


def test_seeded_and_varies_with_seed_and_part():
    recs = _records(n_studies=100)
    a = choose_label_subset(recs, 0.1, seed=3, salt="HAND")
    assert np.array_equal(a.positions, choose_label_subset(recs, 0.1, seed=3, salt="HAND").positions)
    assert not np.array_equal(a.positions, choose_label_subset(recs, 0.1, seed=4, salt="HAND").positions)
    assert not np.array_equal(a.positions, choose_label_subset(recs, 0.1, seed=3, salt="WRIST").positions)


def test_both_classes_appear_when_possible():
    # 1 abnormal study in 50: most random picks of 5 miss it; the walk must find it
    recs = _records(n_studies=50, views=1, abnormal_every=1000)   # only s0 is abnormal
    for seed in range(20):
        sub = choose_label_subset(recs, 0.1, seed=seed)
        labels = [recs[i].abnormal for i in sub.positions]
        assert len(sub.studies) == 5 and any(labels) and not all(labels)
        assert sub.n_seen >= 5
    # no abnormal study at all: still exactly n, one class (the trainer then skips the probe)
    none = [replace(r, abnormal=False) for r in recs]
    sub = choose_label_subset(none, 0.1, seed=0)
    assert len(sub.studies) == 5 and sub.n_seen == 50


def test_labels_outside_the_pick_do_not_change_it():
    recs = _records(n_studies=60)
    sub = choose_label_subset(recs, 0.2, seed=1)
    assert sub.n_seen == len(sub.studies)  # both classes in the first pick: no further label read
    flipped = [r if r.study in sub.studies else replace(r, abnormal=not r.abnormal) for r in recs]
    again = choose_label_subset(flipped, 0.2, seed=1)
    assert np.array_equal(sub.positions, again.positions)


def test_parse_probe_features():
    assert parse_probe_features("global+layer3+score") == (("global", "layer3", "score"), 0, False)
    assert parse_probe_features("hog+pca32+flip") == (("hog",), 32, True)
    for bad in ("", "pixels", "global+global", "pca8", "global+pca0", "flip", "hog+flip+flip"):
        with pytest.raises(ValueError):
            parse_probe_features(bad)


def _toy(n=200, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2 == 0
    x = torch.randn(n, d, generator=g)
    x[:, 0] += torch.where(y, 3.0, -3.0)   # the class sits on one direction among noise ones
    return x, y.numpy()


def _fit(x, y, positions, spec="global"):
    sub = LabelSubset(np.asarray(positions), [f"s{i}" for i in positions], len(y), len(y), len(positions))
    groups = np.array([f"s{i}" for i in positions])
    return fit_probe(x, sub, y[positions], groups, spec, 0.2, 0, [f"p{i}" for i in positions])


def test_probe_learns_a_separable_toy_problem_from_few_labels():
    x, y = _toy()
    probe = _fit(x, y, np.arange(0, 200, 5))   # 40 labels
    p = probe.predict_proba(x).numpy()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, p) > 0.95 and ((p >= 0.5) == y).mean() > 0.9
    assert probe.n_labels == 40 and probe.n_abnormal == int(y[::5].sum()) and probe.cv_auroc > 0.9
    pca = _fit(x, y, np.arange(0, 200, 5), "global+pca5")
    assert pca.projection.shape == (20, 5) and roc_auc_score(y, pca.predict_proba(x).numpy()) > 0.9


def test_probe_ignores_labels_it_was_not_given():
    x, y = _toy()
    used = np.arange(0, 200, 5)
    other = y.copy()
    mask = np.ones(len(y), bool)
    mask[used] = False
    other[mask] = ~other[mask]   # every label outside the subset flipped
    a, b = _fit(x, y, used), _fit(x, other, used)
    assert torch.equal(a.coef, b.coef) and torch.equal(a.intercept, b.intercept)


def test_probe_roundtrip_loads_weights_only(tmp_path):
    x, y = _toy()
    probe = _fit(x, y, np.arange(0, 200, 5), "global+pca5")
    probe.save(tmp_path / "probe.pt")
    raw = torch.load(tmp_path / "probe.pt", weights_only=True)   # no pickle of our classes
    assert len(raw["label_positions"]) == 40 and raw["features"] == "global+pca5"
    back = FewLabelProbe.load(tmp_path / "probe.pt")
    assert torch.allclose(back.predict_proba(x), probe.predict_proba(x))
    assert back.label_positions == probe.label_positions and back.label_paths == probe.label_paths
    assert back.audit() == probe.audit()


def test_hog_votes_for_the_edge_orientation():
    from bonecluster.stage2.fewlabel import hog_features

    vertical = np.zeros((1, 64, 64), np.uint8)
    vertical[:, :, 32:] = 200
    h = hog_features(vertical).view(7, 7, 4, 9)   # 7 x 7 blocks of 2 x 2 cells x 9 bins
    assert h[0, 3, 0, 0] > 0 and h[0, 3, 0, 8] > 0 and h[0, 3, 0, 1:8].sum() == 0   # 0 deg straddles bins 8|0
    assert h[0, 0].sum() == 0   # flat region
    horizontal = np.ascontiguousarray(vertical.transpose(0, 2, 1))
    assert hog_features(horizontal).view(7, 7, 4, 9)[3, 0, 0].argmax() == 4   # 90 deg


def test_flip_mirrors_join_the_fit_without_new_labels():
    x, y = _toy()
    used = np.arange(0, 200, 5)
    sub = LabelSubset(used, [f"s{i}" for i in used], 200, 200, 40)
    probe = fit_probe(x, sub, y[used], np.array([f"s{i}" for i in used]), "global+flip", 0.2, 0, [],
                      mirrored_all=x.flip(1))
    assert probe.n_labels == 40 and probe.n_abnormal == int(y[used].sum())


def _studies(n=300, d=30, sep=1.5, seed=0, per=3):
    """Images in studies of ``per``; a study's images share its label (odd/even study id)."""
    g = torch.Generator().manual_seed(seed)
    study = torch.arange(n) // per
    y = (study % 2 == 0).numpy()
    x = torch.randn(n, d, generator=g)
    x[:, 0] += torch.where(torch.from_numpy(y), sep, -sep)
    return x, y, np.array([f"s{int(s)}" for s in study])


def _fit_studies(x, y, groups, labelled_studies, rounds):
    used = np.flatnonzero(np.isin(groups, [f"s{i}" for i in labelled_studies]))
    sub = LabelSubset(used, sorted(set(groups[used])), len(set(groups)), len(y), len(labelled_studies))
    return fit_probe(x, sub, y[used], groups[used], "global", 0.1, 0, [], all_groups=groups,
                     self_train_rounds=rounds)


def test_study_mean_and_prevalence():
    from bonecluster.stage2.fewlabel import study_prevalence
    from bonecluster.selftrain import study_mean

    groups = np.array(["a", "b", "a", "c", "b"])
    assert np.allclose(study_mean(np.array([1.0, 2.0, 3.0, 4.0, 6.0]), groups), [2.0, 4.0, 2.0, 4.0, 4.0])
    # a study is abnormal when any of its images is: a (yes), b (no), c (yes)
    assert study_prevalence(np.array([True, False, False, True, False]), groups) == 2 / 3


def test_self_training_on_unlabelled_studies_sharpens_the_probe():
    from sklearn.metrics import roc_auc_score

    x, y, groups = _studies()
    labelled = range(0, 100, 9)          # 12 of 100 studies, 36 of 300 images
    plain, selftrained = (_fit_studies(x, y, groups, labelled, rounds) for rounds in (0, 3))
    auc_plain = roc_auc_score(y, plain.predict_proba(x).numpy())
    auc_self = roc_auc_score(y, selftrained.predict_proba(x).numpy())
    assert auc_self > auc_plain + 0.03 and auc_self > 0.95
    assert plain.self_train_rounds == 0 and plain.pseudo_shares == () and plain.coef.shape[0] == 1
    # the default share setting of fit_probe: the labelled studies' abnormal share (6 of 12)
    assert selftrained.self_train_rounds == 3 and selftrained.pseudo_shares == (0.5,)
    assert selftrained.n_labels == 36 and selftrained.audit()["self_train_rounds"] == 3


def test_self_training_reads_no_label_outside_the_subset():
    x, y, groups = _studies()
    labelled = list(range(0, 100, 9))
    other = y.copy()
    outside = ~np.isin(groups, [f"s{i}" for i in labelled])
    other[outside] = ~other[outside]     # every label the probe was not given is flipped
    a, b = _fit_studies(x, y, groups, labelled, 3), _fit_studies(x, other, groups, labelled, 3)
    assert torch.equal(a.coef, b.coef) and torch.equal(a.intercept, b.intercept)


def test_self_training_needs_study_ids():
    x, y, groups = _studies()
    used = np.arange(0, 60)
    sub = LabelSubset(used, sorted(set(groups[used])), 100, 300, 20)
    with pytest.raises(ValueError, match="all_groups"):
        fit_probe(x, sub, y[used], groups[used], "global", 0.2, 0, [], self_train_rounds=2)


def test_probe_saved_before_self_training_still_loads(tmp_path):
    x, y = _toy()
    probe = _fit(x, y, np.arange(0, 200, 5))
    probe.save(tmp_path / "probe.pt")
    raw = torch.load(tmp_path / "probe.pt", weights_only=True)
    for key in ("self_train_rounds", "pseudo_shares", "mix", "threshold", "train_probabilities",
                "train_unsupervised"):
        del raw[key]
    raw["coef"], raw["intercept"] = raw["coef"][0], float(raw["intercept"][0])   # one model, as then
    torch.save(raw, tmp_path / "old.pt")
    old = FewLabelProbe.load(tmp_path / "old.pt")
    assert old.self_train_rounds == 0 and old.pseudo_shares == () and old.coef.shape == probe.coef.shape
    assert old.mix == 0 and old.threshold == 0.5   # scored and flagged as then: its probability at 0.5
    assert torch.allclose(old.predict_proba(x), probe.predict_proba(x))


def test_one_self_trained_probe_per_share_averaged():
    from bonecluster.stage2.fewlabel import pseudo_shares

    x, y, groups = _studies()
    used = np.flatnonzero(np.isin(groups, [f"s{i}" for i in range(0, 100, 9)]))
    sub = LabelSubset(used, sorted(set(groups[used])), len(set(groups)), len(y), 12)
    fit = lambda share: fit_probe(x, sub, y[used], groups[used], "global", 0.1, 0, [], all_groups=groups,
                                  self_train_rounds=2, pseudo_share=share)
    ensemble, singles = fit([0.3, 0.7]), [fit(0.3), fit(0.7)]
    assert ensemble.pseudo_shares == (0.3, 0.7) and ensemble.coef.shape == (2, x.shape[1])
    expected = torch.stack([p.predict_proba(x) for p in singles]).mean(0)
    assert torch.allclose(ensemble.predict_proba(x), expected, atol=1e-6)
    assert ensemble.audit()["pseudo_shares"] == [0.3, 0.7]
    assert pseudo_shares("prevalence", np.array([True, False, False]), np.array(["a", "b", "c"])) == (1 / 3,)
    for bad in ("half", [], [0.5, 1.0]):
        with pytest.raises(ValueError, match="probe_pseudo_share"):
            pseudo_shares(bad, y[:2], groups[:2])


def _mixed_toy(mix):
    x, y = _toy()
    probe = _fit(x, y, np.arange(0, 200, 5))
    prob = probe.predict_proba(x)
    unsup = torch.from_numpy(np.random.default_rng(0).random(len(y))).float()   # a label-free score
    return probe, prob, unsup, probe.with_mix(mix, prob, unsup)


def test_mix_averages_training_percentiles_of_both_scores():
    probe, prob, unsup, mixed = _mixed_toy(0.25)
    assert mixed.mix == 0.25 and probe.mix == 0 and probe.threshold == 0.5   # the original is untouched
    q = torch.tensor([(prob <= p).float().mean() for p in prob])
    u = torch.tensor([(unsup <= v).float().mean() for v in unsup])
    assert torch.allclose(mixed.mixed(prob, unsup), 0.75 * q + 0.25 * u, atol=1e-6)
    # the same probability ranks higher with a higher label-free score
    a, b = mixed.mixed(prob[:1].repeat(2), torch.tensor([unsup.min(), unsup.max()]))
    assert b > a
    # mix 1 is the label-free percentile alone
    assert torch.allclose(probe.with_mix(1.0, prob, unsup).mixed(prob, unsup), u, atol=1e-6)


def test_mix_threshold_flags_as_many_training_images_as_the_probe():
    for mix in (0.25, 0.5, 0.9):
        _, prob, unsup, mixed = _mixed_toy(mix)
        flagged = int((mixed.mixed(prob, unsup) >= mixed.threshold).sum())
        assert flagged == int((prob >= 0.5).sum()) > 0
    probe, prob, unsup, _ = _mixed_toy(0.25)
    none = probe.with_mix(0.25, torch.full_like(prob, 0.1), unsup)   # the probe flags nothing
    assert int((none.mixed(prob, unsup) >= none.threshold).sum()) == 0
    back = probe.with_mix(0.25, prob, unsup).with_mix(0.0, prob, unsup)
    assert back.mix == 0 and back.threshold == 0.5 and back.train_probabilities is None
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="probe_mix"):
            probe.with_mix(bad, prob, unsup)
    with pytest.raises(ValueError, match="one probability"):
        probe.with_mix(0.25, prob, unsup[:-1])


def test_mixed_probe_roundtrip_loads_weights_only(tmp_path):
    _, prob, unsup, mixed = _mixed_toy(0.25)
    mixed.save(tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=True)
    back = FewLabelProbe.load(tmp_path / "probe.pt")
    assert back.mix == 0.25 and back.threshold == mixed.threshold
    assert torch.equal(back.mixed(prob, unsup), mixed.mixed(prob, unsup))
    assert back.audit()["mix"] == 0.25

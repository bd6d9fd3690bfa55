"""The out-of-distribution flag's building blocks: k-NN distances and their percentile."""

import numpy as np
import pytest
import torch

from bonecluster.typicality import Typicality, knn_distances


def _unit(angles_deg):
    """Points on the unit circle at the given angles, (N, 2)."""
    a = torch.tensor(np.radians(angles_deg), dtype=torch.float32)
    return torch.stack([a.cos(), a.sin()], 1)


def test_knn_distances_are_mean_cosine_distances_to_the_k_nearest():
    bank = _unit([0, 90, 180])
    query = _unit([0])
    # cosine distances to the bank: 0, 1, 2
    assert knn_distances(query, bank, k=1).item() == pytest.approx(0.0, abs=1e-6)
    assert knn_distances(query, bank, k=2).item() == pytest.approx(0.5, abs=1e-6)
    assert knn_distances(query, bank, k=3).item() == pytest.approx(1.0, abs=1e-6)


def test_knn_distances_ignore_vector_length():
    bank = _unit([0, 90])
    assert knn_distances(torch.tensor([[5.0, 0.0]]), bank, k=1).item() == pytest.approx(0.0, abs=1e-6)


def test_leave_one_out_skips_the_row_itself_across_batches():
    bank = _unit([0, 10, 30, 70])
    loo = knn_distances(bank, bank, k=1, leave_one_out=True, batch_size=3)
    nearest_gap = np.radians([10, 10, 20, 40])
    np.testing.assert_allclose(loo.numpy(), 1 - np.cos(nearest_gap), atol=1e-6)
    # without leaving out, every film is its own nearest neighbour
    assert knn_distances(bank, bank, k=1).abs().max().item() < 1e-6


@pytest.mark.parametrize("k", [0, 4])
def test_knn_distances_refuse_impossible_k(k):
    bank = _unit([0, 10, 30, 70])
    with pytest.raises(ValueError, match="neighbours"):
        knn_distances(bank, bank, k=k, leave_one_out=True)


def test_leave_one_out_needs_the_bank_as_queries():
    with pytest.raises(ValueError, match="bank itself"):
        knn_distances(_unit([0]), _unit([0, 10]), k=1, leave_one_out=True)


def test_typicality_places_a_distance_among_the_training_films_own():
    # ten training films 1 degree apart: leave-one-out nearest gaps are all 1 degree
    typ = Typicality.fit(_unit(np.arange(10.0)), k=1, percentile=99)
    assert typ.k == 1 and len(typ.reference) == 10
    inside, edge, far = _unit([4.5]), _unit([9.8]), _unit([90.0])
    t = typ.typicality(torch.cat([inside, edge, far]))
    # 0.5 and 0.8 degree from the nearest: every training film is at least as far out -> 100;
    # 80 degrees beyond the last: none is -> 0
    np.testing.assert_allclose(t, [100.0, 100.0, 0.0])
    np.testing.assert_array_equal(typ.in_distribution(t), [True, True, False])


def test_typicality_percentile_sets_the_threshold():
    films = _unit([0, 1, 2, 3, 4, 5, 6, 7, 8, 20])    # one training film far from the others
    typ = Typicality.fit(films, k=1, percentile=90)
    # the far film's own distance is the 100th percentile; a film 10 degrees from all sits
    # between the nine 1-degree films and the far one: 1 of 10 at least as far -> 10 %
    t = typ.typicality(_unit([14.0]))
    assert t[0] == pytest.approx(10.0)
    assert bool(typ.in_distribution(t)[0])                        # 10 >= 100 - 90
    assert not bool(Typicality(typ.bank, typ.reference, 1, 80.0).in_distribution(t)[0])


def test_fit_lowers_k_for_tiny_runs_and_refuses_one_film():
    assert Typicality.fit(_unit([0, 5, 9])).k == 2
    with pytest.raises(ValueError, match="two training films"):
        Typicality.fit(_unit([0]))
    with pytest.raises(ValueError, match="percentile"):
        Typicality.fit(_unit([0, 5]), percentile=0)


def test_save_and_load_round_trip(tmp_path):
    typ = Typicality.fit(torch.randn(30, 8), k=3, percentile=95)
    typ.save(tmp_path / "typicality.npz")
    back = Typicality.load(tmp_path / "typicality.npz")
    assert back.k == 3 and back.percentile == 95
    torch.testing.assert_close(back.bank, typ.bank)
    np.testing.assert_array_equal(back.reference, typ.reference)
    queries = torch.randn(5, 8)
    np.testing.assert_array_equal(back.typicality(queries), typ.typicality(queries))
    assert [p.name for p in tmp_path.iterdir()] == ["typicality.npz"]   # no temporary left behind


def test_standardise_scales_each_column_by_the_training_films_and_survives_save(tmp_path):
    rng = np.random.default_rng(0)
    # column 0 spreads 1000 times wider than column 1: unstandardised, cosine distances see column 0 only
    train = torch.from_numpy(np.c_[rng.normal(0, 1000, 40), rng.normal(0, 1, 40)].astype(np.float32))
    typ = Typicality.fit(train, k=3, standardise=True, metric="euclidean")
    np.testing.assert_allclose(typ.bank.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(typ.bank.std(0).numpy(), 1, atol=1e-4)
    # a film far out in the narrow column only is flagged once the columns are standardised
    odd = torch.tensor([[0.0, 50.0]])
    assert typ.typicality(odd)[0] < 1.0
    assert Typicality.fit(train, k=3, metric="euclidean").typicality(odd)[0] > 1.0
    typ.save(tmp_path / "t.npz")
    back = Typicality.load(tmp_path / "t.npz")
    assert back.metric == "euclidean"
    np.testing.assert_allclose(back.distance(odd), typ.distance(odd), rtol=1e-6)


def test_a_constant_column_does_not_divide_by_zero():
    train = torch.tensor([[1.0, 2.0], [1.0, 3.0], [1.0, 5.0]])
    typ = Typicality.fit(train, k=1, standardise=True, metric="euclidean")
    assert torch.isfinite(typ.bank).all() and np.isfinite(typ.distance(torch.tensor([[4.0, 2.0]]))).all()


def test_euclidean_distances_count_the_length_and_cosine_ones_do_not():
    bank = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    query = torch.tensor([[2.0, 0.0]])
    assert knn_distances(query, bank, k=2, metric="euclidean").item() == pytest.approx(1.0)
    assert knn_distances(query, bank, k=2).item() == pytest.approx(0.0, abs=1e-6)
    loo = knn_distances(bank, bank, k=1, leave_one_out=True, metric="euclidean", batch_size=2)
    np.testing.assert_allclose(loo.numpy(), [2.0, 2.0, np.sqrt(5)], rtol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        knn_distances(query, bank, k=1, metric="manhattan")


def test_a_file_written_before_standardise_and_metric_loads_as_cosine(tmp_path):
    bank = _unit([0, 40, 90, 200])
    old = Typicality.fit(bank, k=1)
    np.savez(tmp_path / "old.npz", bank=old.bank.numpy(), reference=old.reference, k=np.int64(1),
             percentile=np.float64(99.0))
    back = Typicality.load(tmp_path / "old.npz")
    assert back.metric == "cosine" and back.center is None and back.scale is None
    np.testing.assert_allclose(back.distance(_unit([10])), old.distance(_unit([10])))

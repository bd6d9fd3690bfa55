from __future__ import annotations

import numpy as np
import pytest
import torch

from bonecluster.anomaly import (Gaussian, combine_scores, gaussian_scores, greedy_coreset, knn_scores, label_free_threshold,
                                 mean_rank, normalise, patch_gaussian_scores, percentile_of, patch_knn_scores)


def test_knn_scores_exact_small_case():
    bank = normalise(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    q = normalise(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    s = knn_scores(bank, q, k=2)
    # first query: two identical neighbours (distance 0); second: one at 0, next at 1 -> 0.5
    assert s.tolist() == pytest.approx([0.0, 0.5])


def test_leave_one_out_excludes_self():
    bank = normalise(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    s = knn_scores(bank, bank, k=1, exclude_self=True)
    assert s.tolist() == pytest.approx([1.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        knn_scores(bank[:1], bank[:1], exclude_self=True)


def test_outliers_score_higher_than_a_dense_cluster():
    g = torch.Generator().manual_seed(0)
    normal = normalise(torch.randn(200, 8, generator=g) * 0.1 + torch.tensor([1.0] + [0.0] * 7))
    odd = normalise(torch.randn(10, 8, generator=g))
    bank = torch.cat([normal, odd])
    s = knn_scores(bank, bank, k=5, exclude_self=True)
    assert s[200:].min() > s[:200].median()


def test_gmm_threshold_separates_two_modes():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.lognormal(np.log(0.1), 0.2, 300), rng.lognormal(np.log(0.5), 0.2, 100)])
    t = label_free_threshold(scores)
    assert t.method == "gmm" and 0.15 < t.value < 0.4


def test_threshold_falls_back_on_constant_scores():
    t = label_free_threshold(np.full(10, 0.3))
    assert t.method == "quantile" and t.value == pytest.approx(0.3)


def test_leave_one_group_out_skips_the_whole_study():
    bank = normalise(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    groups = torch.tensor([0, 0, 1, 2])
    s = knn_scores(bank, bank, k=1, exclude_self=True, groups=groups)
    # rows 0 and 1 may not match each other: nearest is row 3 (cos 0.6); row 2 -> row 3 (cos 0.8)
    assert s.tolist() == pytest.approx([0.4, 0.4, 0.2, 0.2])
    with pytest.raises(ValueError):
        knn_scores(bank[:2], bank[:2], exclude_self=True, groups=torch.tensor([5, 5]))


def test_group_ids_may_be_large_hashes():
    """Study ids hashed to 63-bit integers give the same scores as small ids, without allocating
    an array as long as the id range (bincount would need exabytes here)."""
    bank = normalise(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    big = torch.tensor([2**62, 2**62, -(2**61), 7])
    small = knn_scores(bank, bank, k=1, exclude_self=True, groups=torch.tensor([0, 0, 1, 2]))
    assert knn_scores(bank, bank, k=1, exclude_self=True, groups=big).tolist() == small.tolist()


def test_patch_scores_take_the_worst_position_exactly():
    e0, e1, e2 = torch.eye(3)
    bank = torch.stack([e0, e1])                                  # two training patches
    odd = normalise(torch.tensor([[0.0, 0.6, 0.8]]))[0]
    queries = torch.stack([torch.stack([e0, e1]), torch.stack([e0, odd]), torch.stack([e2, e2])])
    s = patch_knn_scores(bank, queries, k=1)
    # all patches seen -> 0; one patch at cos 0.6 from its nearest -> 0.4; unseen direction -> 1
    assert s.tolist() == pytest.approx([0.0, 0.4, 1.0])
    assert patch_knn_scores(bank, queries[1:2], k=2).tolist() == pytest.approx([0.7])  # (0.4 + 1) / 2


def test_patch_scores_leave_out_own_image_and_study():
    e0, e1 = torch.eye(2)
    patches = torch.stack([torch.stack([e0, e0]), torch.stack([e0, e0]), torch.stack([e1, e1])])  # (3, 2, 2)
    bank, owner = patches.reshape(-1, 2), torch.arange(3).repeat_interleave(2)
    s = patch_knn_scores(bank, patches, k=1, bank_images=owner, exclude_self=True)
    assert s.tolist() == pytest.approx([0.0, 0.0, 1.0])          # images 0 and 1 match each other
    s = patch_knn_scores(bank, patches, k=1, bank_images=owner, exclude_self=True, groups=torch.tensor([0, 0, 1]))
    assert s.tolist() == pytest.approx([1.0, 1.0, 1.0])          # same study: no longer a match
    with pytest.raises(ValueError):
        patch_knn_scores(bank, patches, exclude_self=True)       # needs bank_images


def test_greedy_coreset_takes_one_row_from_each_far_group_first():
    """Three tight groups far apart: whatever row it starts from, the next two picks are the other
    groups' (the farthest rows), never a second row of a group already covered."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centres[:, None, :] + 0.01 * torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0))).reshape(-1, 2)
    for seed in range(6):
        picks = greedy_coreset(points, 3, seed=seed)
        assert sorted((picks // 5).tolist()) == [0, 1, 2]
        assert torch.equal(picks, greedy_coreset(points, 3, seed=seed))   # the seed fixes the start
    assert len(greedy_coreset(points, 99)) == 15 and sorted(greedy_coreset(points, 99).tolist()) == list(range(15))


def test_greedy_coreset_exact_on_a_line_and_refuses_nothing_to_cover():
    """Points 0, 1, 3, 10: from each start, every next pick is the point farthest from its nearest pick."""
    points = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    order = {0.0: [0.0, 10.0, 3.0, 1.0], 1.0: [1.0, 10.0, 3.0, 0.0], 3.0: [3.0, 10.0, 0.0, 1.0],
             10.0: [10.0, 0.0, 3.0, 1.0]}
    starts = set()
    for seed in range(12):
        picked = points[greedy_coreset(points, 4, seed=seed), 0].tolist()
        assert picked == order[picked[0]]
        starts.add(picked[0])
    assert len(starts) > 1   # the seed moves the start
    with pytest.raises(ValueError, match="non-empty"):
        greedy_coreset(torch.empty(0, 3), 2)
    with pytest.raises(ValueError, match="at least one"):
        greedy_coreset(points, 0)


def test_greedy_coreset_projects_wide_rows_and_stops_when_all_are_covered():
    """512-wide rows (projected to 128 before the distances): three far groups still give one pick
    each; rows that are copies of two distinct rows give two picks, however many are asked for."""
    g = torch.Generator().manual_seed(1)
    centres = 10 * torch.randn(3, 512, generator=g)
    points = (centres[:, None, :] + 0.01 * torch.randn(3, 4, 512, generator=g)).reshape(-1, 512)
    assert sorted((greedy_coreset(points, 3, seed=2) // 4).tolist()) == [0, 1, 2]
    copies = torch.stack([centres[0]] * 5 + [centres[1]] * 3)
    picks = greedy_coreset(copies, 6, seed=0)
    assert len(picks) == 2 and sorted((picks >= 5).tolist()) == [False, True]


def test_combine_scores_divides_by_training_medians():
    train = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])]
    queries = [torch.tensor([4.0]), torch.tensor([10.0])]
    t, q = combine_scores(train, queries)
    assert t.tolist() == pytest.approx([0.5, 1.0, 1.5]) and q.tolist() == pytest.approx([(2.0 + 0.5) / 2])


def test_mean_rank_averages_ranks_not_values():
    # ranks/3: [1, 2, 3] -> [1/3, 2/3, 1]; [30, 10, 20] -> [1, 1/3, 2/3]; scale does not matter
    got = mean_rank([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([30.0, 10.0, 20.0])])
    assert torch.allclose(got, torch.tensor([2 / 3, 1 / 2, 5 / 6]))
    # ties share the mean rank; one scoring alone becomes its ranks
    assert torch.allclose(mean_rank([torch.tensor([5.0, 5.0, 1.0, 9.0])]), torch.tensor([2.5, 2.5, 1, 4]) / 4)


def test_mean_rank_rejects_mismatched_scores():
    for bad in ([], [torch.zeros(3), torch.zeros(4)], [torch.zeros(2, 2)]):
        with pytest.raises(ValueError, match="same length"):
            mean_rank(bad)



def test_percentile_of_counts_reference_scores_at_or_below():
    ref = torch.tensor([3.0, 1.0, 2.0, 2.0])
    got = percentile_of(ref, torch.tensor([0.0, 1.0, 2.0, 2.5, 5.0]))
    assert got.tolist() == [0.0, 0.25, 0.75, 0.75, 1.0]
    with pytest.raises(ValueError):
        percentile_of(torch.zeros(0), torch.tensor([1.0]))


def test_gaussian_score_follows_the_training_spread_not_the_euclidean_distance():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(4000, 2, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 10.0], dtype=torch.float64)
    g = Gaussian.fit(train)
    assert g.distance(g.mean[None]).item() == pytest.approx(0.0, abs=1e-6)
    # 3 units along the narrow axis are 3 standard deviations; along the wide one, 0.3
    queries = train.mean(dim=0) + torch.tensor([[3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    narrow, wide = gaussian_scores(train, queries)
    assert narrow.item() == pytest.approx(3.0, rel=0.1) and wide.item() == pytest.approx(0.3, rel=0.1)
    with pytest.raises(ValueError, match="N >= 2"):
        Gaussian.fit(train[:1])


def test_patch_gaussian_score_is_the_largest_position_distance():
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 5.0, 0.2])[None, :, None]     # each position its own spread
    train = torch.randn(500, 3, 4, generator=gen) * scale
    same = train.mean(dim=0, keepdim=True)                 # every position at its mean
    odd = same.clone()
    odd[0, 2] += 1.2                                       # 6 spreads out at the narrow position
    wide = same.clone()
    wide[0, 1] += 1.2                                      # the same step, a quarter spread where it is wide
    scores = patch_gaussian_scores(train, torch.cat([same, odd, wide]))
    assert scores[0] < 0.5 and scores[2] < 0.5 < 4.0 < scores[1]   # one Gaussian per position, not one for all
    per_position = [gaussian_scores(train[:, i], odd[:, i]) for i in range(3)]
    assert scores[1].item() == pytest.approx(max(p.item() for p in per_position))
    with pytest.raises(ValueError, match="must be"):
        patch_gaussian_scores(train, torch.randn(2, 4, 4))

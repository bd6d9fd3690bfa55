"""SimCLR's NT-Xent loss, MoCo's queue InfoNCE, the projection head, DINO's head, loss and teacher update, and the
balanced Sinkhorn assignment."""

from __future__ import annotations

import math

import pytest
import torch

from bonecluster.selfsup import (DinoHead, ProjectionHead, dino_loss, ema_, normalised_entropy, nt_xent,
                                 queue_info_nce, sinkhorn_balanced)


def test_nt_xent_matches_the_formula_on_two_pairs():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    # Anchor z1[0]: positive z2[0] (cos 1); negatives z1[1] and z2[1] (cos 0). Same for all 4 anchors.
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * math.exp(0.0)))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_is_lower_for_matching_views_than_for_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    noisy = z + 0.05 * torch.randn(16, 8, generator=g)
    assert nt_xent(z, noisy).item() < nt_xent(z, noisy.roll(1, dims=0)).item()


def test_nt_xent_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.zeros(4, 3), torch.zeros(5, 3))


def test_queue_info_nce_matches_the_formula_with_batch_and_queue_negatives():
    q = torch.tensor([[2.0, 0.0], [0.0, 1.0]])               # scaled: the loss compares directions
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    queue = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [0.6, -0.8]])
    tau = 0.5
    # Query 0 = (1, 0): positive k0 (cos 1); negatives k1 (0.6), queue rows (-1, 0, 0.6).
    # Query 1 = (0, 1): positive k1 (0.8); negatives k0 (0), queue rows (0, -1, -0.8).
    def term(positive, negatives):
        return -math.log(math.exp(positive / tau) / sum(math.exp(c / tau) for c in [positive, *negatives]))

    expected = (term(1.0, [0.6, -1.0, 0.0, 0.6]) + term(0.8, [0.0, 0.0, -1.0, -0.8])) / 2
    assert queue_info_nce(q, k, queue, tau).item() == pytest.approx(expected, rel=1e-6)
    # An empty queue leaves the batch's own keys as the only negatives (MoCo v3).
    expected_batch = (term(1.0, [0.6]) + term(0.8, [0.0])) / 2
    assert queue_info_nce(q, k, torch.zeros(0, 2), tau).item() == pytest.approx(expected_batch, rel=1e-6)


def test_queue_info_nce_sends_gradient_to_the_queries_only():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(6, 4, generator=g, requires_grad=True)
    queue_info_nce(q, k, torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=1)).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad is None


def test_a_films_own_key_left_in_the_queue_counts_against_it():
    # Why selfsup.moco_queue is kept under the number of films: an old key of the query's own film
    # in the queue is a negative as close as the positive: about log 2 more loss at a sharp temperature.
    g = torch.Generator().manual_seed(2)
    k = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    q = k + 0.01 * torch.randn(8, 16, generator=g)
    far = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    gap = queue_info_nce(q, k, k, 0.05).item() - queue_info_nce(q, k, far, 0.05).item()
    assert gap == pytest.approx(math.log(2), abs=0.01)


def test_queue_info_nce_rejects_a_queue_of_another_width():
    with pytest.raises(ValueError, match=r"\(K, d\) queue"):
        queue_info_nce(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(5, 2))


def test_projection_head_shapes():
    assert ProjectionHead(32, 16, 8)(torch.randn(5, 32)).shape == (5, 8)


def test_dino_loss_matches_the_formula_on_two_views():
    # One image, K = 2. Teacher view 0 centred and sharpened: softmax([1, 0] / 0.5) = [e^2, 1] / (e^2 + 1).
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    student = torch.tensor([[[0.0, 0.0]], [[0.0, 1.0]]])
    t0 = torch.tensor([math.exp(2), 1.0]) / (math.exp(2) + 1)
    log_s1 = torch.log_softmax(torch.tensor([0.0, 1.0]), 0)     # student view 1, t_s = 1
    t1 = torch.tensor([0.5, 0.5])                                # teacher view 1 is flat
    log_s0 = torch.log_softmax(torch.tensor([0.0, 0.0]), 0)
    expected = (-(t0 * log_s1).sum() - (t1 * log_s0).sum()) / 2
    got = dino_loss(student, teacher, torch.zeros(2), student_temperature=1.0, teacher_temperature=0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_dino_loss_subtracts_the_center_and_pairs_only_different_views():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    shift = torch.randn(5, generator=g)
    # Centring on a constant shift of the teacher's outputs undoes it exactly.
    centred = dino_loss(student, teacher + shift, shift).item()
    assert centred == pytest.approx(dino_loss(student, teacher, torch.zeros(5)).item(), rel=1e-6)
    # A student that copies the teacher view by view is rewarded only across views.
    same = dino_loss(teacher.clone(), teacher, torch.zeros(5))
    crossed = dino_loss(teacher.flip(0), teacher, torch.zeros(5))
    assert crossed.item() < same.item()


def test_normalised_entropy_is_one_for_flat_rows_and_zero_for_one_hot_rows():
    assert normalised_entropy(torch.full((3, 8), 1 / 8)) == pytest.approx(1.0)
    assert normalised_entropy(torch.eye(8)) == pytest.approx(0.0, abs=1e-9)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]])   # ln 2 / ln 4
    assert normalised_entropy(half) == pytest.approx(0.5)


def test_dino_loss_rejects_one_view():
    with pytest.raises(ValueError, match="V >= 2"):
        dino_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.zeros(3))


def test_dino_head_gives_cosine_scores_over_its_prototypes():
    out = DinoHead(32, 16, 8, prototypes=12)(torch.randn(5, 32))
    assert out.shape == (5, 12) and out.abs().max().item() <= 1.0 + 1e-6


def test_ema_moves_the_target_toward_the_source_by_one_minus_momentum():
    target, source = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = target.weight.detach().clone()
    ema_(target, source, momentum=0.9)
    torch.testing.assert_close(target.weight, 0.9 * before + 0.1 * source.weight.detach())
    ema_(target, source, momentum=1.0)    # momentum 1 freezes the target
    torch.testing.assert_close(target.weight, 0.9 * before + 0.1 * source.weight.detach())


def test_sinkhorn_balances_a_lopsided_problem():
    # Every item prefers cluster 0 a little; a plain argmax puts all 90 there.
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(90, 3, generator=g) * 0.1
    scores[:, 0] += 0.2
    q = sinkhorn_balanced(scores, epsilon=0.05, n_iter=200)
    assert torch.allclose(q.sum(1), torch.ones(90), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((3,), 30.0), atol=0.5)
    assert torch.bincount(q.argmax(1), minlength=3).min() >= 25


def test_sinkhorn_keeps_a_clear_balanced_structure():
    labels = torch.arange(60) % 3
    scores = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.equal(sinkhorn_balanced(scores).argmax(1), labels)


def test_sinkhorn_rejects_empty_input():
    with pytest.raises(ValueError, match="non-empty"):
        sinkhorn_balanced(torch.zeros(0, 3))


def test_multi_crop_loss_averages_the_full_pair_and_every_small_to_full_pair():
    from types import SimpleNamespace

    from bonecluster.methods.simclr import SimCLR

    torch.manual_seed(0)
    n, d, tau = 6, 8, 0.2
    out = torch.randn(2 * n, d)
    small = torch.randn(3 * n, d)
    fake = SimpleNamespace(cfg=SimpleNamespace(selfsup=SimpleNamespace(temperature=tau)))
    loss = SimCLR.local_loss(fake, out, small)
    a, b = out[:n], out[n:]
    terms = [nt_xent(a, b, tau)] + [nt_xent(small[l * n:(l + 1) * n], v, tau) for l in range(3) for v in (a, b)]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    # small views that point at their own film's full views score lower than the same views shuffled
    own = torch.cat([a + 0.05 * torch.randn(n, d) for _ in range(3)])
    shuffled = own[torch.randperm(3 * n)]
    assert SimCLR.local_loss(fake, torch.cat([a, a]), own) < SimCLR.local_loss(fake, torch.cat([a, a]), shuffled)

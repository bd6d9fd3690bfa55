"""Domain-adversarial phantom pre-training (``phantoms.adapt``): the reversal layer, the ramp,
the domain head, the checks on the real films, the weights file and its cache key."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bonecluster.config import load_config
from bonecluster.phantom_pretrain import (DomainHead, _Adversary, adversary_weight, cached_phantom_weights,
                                          check_real_films, films_digest, pretrain_on_phantoms, reverse_gradient,
                                          weights_key)

TINY = ["data.size=32", "data.fit=letterbox", "phantoms.films=64", "phantoms.epochs=1", "phantoms.batch_size=16",
        "phantoms.validation_films=16", "train.device=cpu"]


def _films(n: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_the_reversal_layer_passes_values_and_turns_gradients_round():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = reverse_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.25, -0.5, -1.0]))


def test_the_reversal_weight_ramps_from_zero_to_adapt():
    assert adversary_weight(0.0, 1.0) == 0.0
    assert adversary_weight(0.5, 2.0) == pytest.approx(2.0 * (2 / (1 + math.exp(-5)) - 1))
    assert adversary_weight(1.0, 1.0) == pytest.approx(1.0, abs=1e-4)
    ramp = [adversary_weight(p / 10, 0.5) for p in range(11)]
    assert all(a < b for a, b in zip(ramp, ramp[1:])) and ramp[-1] <= 0.5


def test_the_adversary_labels_phantoms_0_and_real_films_1_and_reports_its_loss_and_accuracy():
    torch.manual_seed(0)
    head = DomainHead(4, hidden=8)
    features = torch.randn(10, 4)
    adversary = _Adversary(head, _films(), adapt=1.0, total_steps=5)
    loss = adversary.loss(features, n_phantoms=6)
    logits = head(features).detach()
    target = torch.tensor([0.0] * 6 + [1.0] * 4)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(loss.detach()) == pytest.approx(float(expected))
    row = adversary.take_epoch()
    assert row["domain_accuracy"] == pytest.approx(float(((logits > 0).float() == target).float().mean()))
    assert row["domain_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert adversary.take_epoch() == {"domain_loss": 0.0, "domain_accuracy": 0.0} and adversary.step == 1


def test_the_backbone_side_gets_the_domain_gradient_reversed_at_the_ramps_weight():
    torch.manual_seed(0)
    features = torch.randn(6, 4, requires_grad=True)
    adversary = _Adversary(DomainHead(4, hidden=8), _films(), adapt=1.0, total_steps=3)
    adversary.step = 2                                       # the last step: weight adversary_weight(1, 1)
    adversary.loss(features, n_phantoms=3).backward()
    reversed_grad = features.grad.clone()
    plain = features.detach().clone().requires_grad_(True)
    logits = adversary.head(plain).float()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.0] * 3 + [1.0] * 3)).backward()
    assert torch.allclose(reversed_grad, -adversary_weight(1.0, 1.0) * plain.grad, atol=1e-6)


def test_pretraining_ramps_the_reversal_weight_over_every_step_of_every_epoch(tmp_path, monkeypatch, single_torch_thread):
    import bonecluster.phantom_pretrain as pp

    seen = []
    monkeypatch.setattr(pp, "adversary_weight", lambda progress, adapt: seen.append((progress, adapt)) or 0.0)
    cfg = load_config("cpu", overrides=TINY + ["phantoms.adapt=0.7", "phantoms.epochs=2"])
    history = pretrain_on_phantoms(cfg, tmp_path / "w.pt", progress=False, real_films=_films()).history
    assert len(seen) == 2 * (64 // 16)                       # one weight per step, both epochs
    assert seen[0] == (0.0, 0.7) and seen[-1] == (1.0, 0.7)
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    assert all(set(row) >= {"loss", "domain_loss", "domain_accuracy"} for row in history)


def test_real_films_are_checked_against_adapt_and_the_size():
    p = load_config("cpu", overrides=TINY).phantoms
    assert check_real_films(_films(), p, 32) is None                       # adapt 0: not used
    p.adapt = 1.0
    assert check_real_films(_films(), p, 32) is not None
    with pytest.raises(ValueError, match="phantoms.adapt=1.0 needs unlabelled real films.*--adapt-to"):
        check_real_films(None, p, 32)
    with pytest.raises(ValueError, match=r"uint8 \(N, 32, 32\).*\(24, 48, 48\)"):
        check_real_films(_films(size=48), p, 32)
    for bad in (-1.0, float("nan")):
        p.adapt = bad
        with pytest.raises(ValueError, match="phantoms.adapt"):
            check_real_films(_films(), p, 32)


def test_pretraining_with_adapt_records_the_films_and_what_the_domain_head_told_apart(tmp_path, single_torch_thread):
    films = _films()
    plain = pretrain_on_phantoms(load_config("cpu", overrides=TINY), tmp_path / "plain.pt", progress=False)
    cfg = load_config("cpu", overrides=TINY + ["phantoms.adapt=1"])
    adapted = pretrain_on_phantoms(cfg, tmp_path / "adapted.pt", progress=False, real_films=films)
    meta = json.loads((tmp_path / "adapted.pt.json").read_text())
    assert meta["adapted_to"] == {"films": 24, "digest": films_digest(films)}
    assert meta["phantoms"]["adapt"] == 1.0
    assert 0.0 <= meta["history"][0]["domain_accuracy"] <= 1.0
    assert "domain_accuracy" not in plain.history[0]
    # the same seed and phantoms, so only the adversary makes the weights differ
    a = torch.load(plain.weights, weights_only=True)["model"]["backbone.conv1.weight"]
    b = torch.load(adapted.weights, weights_only=True)["model"]["backbone.conv1.weight"]
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="--adapt-to"):
        pretrain_on_phantoms(cfg, tmp_path / "none.pt", progress=False)
    assert not (tmp_path / "none.pt").exists()


def test_the_cache_key_names_the_films_adapted_to_and_adapt_0_leaves_keys_as_they_were(tmp_path, single_torch_thread):
    cfg = load_config("cpu", overrides=TINY)
    assert weights_key(load_config("cpu", overrides=TINY + ["phantoms.adapt=0"])) == weights_key(cfg)
    assert weights_key(cfg, _films()) == weights_key(cfg)                # films unused at adapt 0
    adapt = load_config("cpu", overrides=TINY + ["phantoms.adapt=1"])
    keys = {weights_key(adapt, _films(seed=0)), weights_key(adapt, _films(seed=1)), weights_key(cfg)}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="--adapt-to"):
        weights_key(adapt)
    first = cached_phantom_weights(adapt, tmp_path, progress=False, real_films=_films())
    stamp = first.stat().st_mtime_ns
    assert cached_phantom_weights(adapt, tmp_path, progress=False, real_films=_films()) == first
    assert first.stat().st_mtime_ns == stamp
    assert first.stem == weights_key(adapt, _films())

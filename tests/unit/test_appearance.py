"""The network-free appearance histograms of the out-of-distribution flag."""

import numpy as np
import pytest

from bonecluster.descriptors import APPEARANCE_MAX_GRADIENT, appearance


def test_each_half_is_a_histogram_of_the_pixels():
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16), dtype=np.uint8)
    feats = appearance(images, bins=8, batch_size=2).numpy()
    assert feats.shape == (5, 16)
    np.testing.assert_allclose(feats[:, :8].sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(feats[:, 8:].sum(1), 1, atol=1e-6)
    # the grey half is numpy's histogram of the same pixels
    expected = np.histogram(images[3], bins=8, range=(0, 256))[0] / 256
    np.testing.assert_allclose(feats[3, :8], expected, atol=1e-6)


def test_a_flat_film_has_no_edges_and_a_sharp_step_lands_in_the_top_gradient_bin():
    flat = np.full((1, 8, 8), 128, np.uint8)
    f = appearance(flat, bins=4).numpy()[0]
    assert f[2] == pytest.approx(1.0) and f[4] == pytest.approx(1.0)   # grey 128 -> bin 2 of 4; gradient 0
    step = np.zeros((1, 8, 8), np.uint8)
    step[:, :, 4:] = 255                 # a black-to-white step: central differences of 1 > the top bin's start
    assert APPEARANCE_MAX_GRADIENT < 1.0
    g = appearance(step, bins=4).numpy()[0, 4:]
    assert g[-1] == pytest.approx(2 * 8 / 64) and g[0] == pytest.approx(1 - 2 * 8 / 64)


def test_no_films_give_an_empty_table():
    assert tuple(appearance(np.zeros((0, 8, 8), np.uint8), bins=4).shape) == (0, 8)

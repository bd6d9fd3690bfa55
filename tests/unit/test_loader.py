from __future__ import annotations

import pickle

import numpy as np
import torch

from bonecluster.data import prepare, read_records
from bonecluster.data.decode import Preprocess
from bonecluster.data.loader import CachedBatches, batch_loader, to_float
from tests.conftest import make_mura_tree


def _ds(tmp_path):
    make_mura_tree(tmp_path / "d")
    return prepare(read_records(tmp_path / "d"), tmp_path / "c", Preprocess(size=16), workers=1, progress=False)


def test_batches_match_the_view_in_sampler_order(tmp_path):
    ds = _ds(tmp_path)
    imgs = ds.images()
    order = [5, 0, 7, 2, 2, 1]
    batches = list(batch_loader(ds, batch_size=4, sampler=order))
    assert [b.shape for b in batches] == [(4, 1, 16, 16), (2, 1, 16, 16)]
    got = torch.cat(batches)[:, 0].numpy()
    np.testing.assert_array_equal(got, imgs[order])


def test_dataset_pickles_without_the_memmap(tmp_path):
    cb = CachedBatches(_ds(tmp_path))
    cb[[0]]
    clone = pickle.loads(pickle.dumps(cb))
    assert clone._pixels is None
    assert torch.equal(clone[[3, 1]], cb[[3, 1]])


def test_to_float_range():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    y = to_float(x, "cpu")
    assert y.dtype == torch.float32 and y.min() == 0 and y.max() == 1

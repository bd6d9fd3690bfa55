from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bonecluster.data import DataError, SkipLog, prepare, read_records
from bonecluster.data.cache import PixelStore, PreparedDataset, store_dir_for
from bonecluster.data.decode import Preprocess, load_image
from tests.conftest import make_mura_tree, write_png

PRE = Preprocess(size=16)


def _prepare(root, cache, **kw):
    return prepare(read_records(root), cache, PRE, workers=1, progress=False, **kw)


def test_prepare_decodes_once_and_matches_direct_decoding(tmp_path):
    make_mura_tree(tmp_path / "d")
    ds = _prepare(tmp_path / "d", tmp_path / "c")
    assert len(ds) == 8 and ds.n_decoded == 8 and ds.n_reused == 0
    imgs = ds.images()
    assert imgs.shape == (8, 16, 16) and imgs.dtype == np.uint8
    for rec, img in zip(ds.records, imgs):
        np.testing.assert_array_equal(img, load_image(rec.path, PRE))
    again = _prepare(tmp_path / "d", tmp_path / "c")
    assert again.n_decoded == 0 and again.n_reused == 8
    np.testing.assert_array_equal(again.images(), imgs)


def test_changed_file_is_decoded_again(tmp_path):
    paths = make_mura_tree(tmp_path / "d")
    _prepare(tmp_path / "d", tmp_path / "c")
    write_png(paths[0], value=255)
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds = _prepare(tmp_path / "d", tmp_path / "c")
    assert ds.n_decoded == 1
    idx = [r.path for r in ds.records].index(str(paths[0]))
    np.testing.assert_array_equal(ds.images()[idx], load_image(paths[0], PRE))


def test_other_settings_get_their_own_store(tmp_path):
    make_mura_tree(tmp_path / "d")
    a = _prepare(tmp_path / "d", tmp_path / "c")
    b = prepare(read_records(tmp_path / "d"), tmp_path / "c", Preprocess(size=8), workers=1, progress=False)
    assert a.store_dir != b.store_dir and b.images().shape == (8, 8, 8)


def test_bad_files_are_skipped_counted_and_remembered(tmp_path):
    make_mura_tree(tmp_path / "d")
    bad = tmp_path / "d" / "train" / "XR_HAND" / "patient00000" / "study1_positive" / "image9.png"
    bad.write_bytes(b"")
    ds = _prepare(tmp_path / "d", tmp_path / "c")
    assert len(ds) == 8 and len(ds.skipped) == 1
    assert ds.skipped.items[0].path.endswith("image9.png") and "empty" in ds.skipped.items[0].reason
    again = _prepare(tmp_path / "d", tmp_path / "c")  # the skip is cached, and reported again
    assert again.n_decoded == 0 and len(again.skipped) == 1


def test_no_usable_image_is_fatal(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="no usable image"):
        _prepare(tmp_path / "d", tmp_path / "c")


def test_parallel_decoding_gives_the_same_bytes(tmp_path):
    make_mura_tree(tmp_path / "d")
    a = _prepare(tmp_path / "d", tmp_path / "c1")
    b = prepare(read_records(tmp_path / "d"), tmp_path / "c2", PRE, workers=2, progress=False)
    np.testing.assert_array_equal(a.images(), b.images())


def test_torn_index_and_orphan_pixels_are_repaired(tmp_path):
    make_mura_tree(tmp_path / "d")
    clean = _prepare(tmp_path / "d", tmp_path / "clean").images()
    _prepare(tmp_path / "d", tmp_path / "c")
    store = store_dir_for(tmp_path / "c", PRE)
    # simulate a kill: keep 3 index lines plus half a line, and extra pixel bytes
    lines = (store / "index.jsonl").read_bytes().splitlines(keepends=True)
    (store / "index.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:10])
    with open(store / "pixels.u8", "ab") as f:
        f.write(b"\x07" * 100)
    opened = PixelStore(store, PRE).open()
    assert opened.n_rows == 3 and (store / "pixels.u8").stat().st_size == 3 * 16 * 16
    ds = _prepare(tmp_path / "d", tmp_path / "c")
    assert ds.n_decoded == 5
    np.testing.assert_array_equal(ds.images(), clean)


def test_store_refuses_other_settings_in_same_folder(tmp_path):
    PixelStore(tmp_path / "s", PRE).open()
    with pytest.raises(RuntimeError, match="settings differ"):
        PixelStore(tmp_path / "s", Preprocess(size=8)).open()


def test_view_round_trip(tmp_path):
    make_mura_tree(tmp_path / "d")
    bad = tmp_path / "d" / "train" / "XR_HAND" / "patient00000" / "study1_positive" / "x.png"
    bad.write_bytes(b"")
    ds = _prepare(tmp_path / "d", tmp_path / "c")
    ds.save(tmp_path / "view.json")
    back = PreparedDataset.load(tmp_path / "view.json")
    assert back.records == ds.records and len(back.skipped) == 1
    np.testing.assert_array_equal(back.images(), ds.images())
    assert json.loads((tmp_path / "view.json").read_text())["format"] == 1


def test_subset_keeps_rows_and_records(tmp_path):
    make_mura_tree(tmp_path / "d")
    ds = _prepare(tmp_path / "d", tmp_path / "c")
    sub = ds.subset([6, 1])
    assert sub.records == [ds.records[6], ds.records[1]]
    np.testing.assert_array_equal(sub.images(), ds.images()[[6, 1]])

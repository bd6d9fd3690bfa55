"""predict's chunks end where a study does, so a study's images are assigned together."""

from __future__ import annotations

import numpy as np

from bonecluster.data.records import Record
from bonecluster.predict import _predict_chunks


class _Data:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def subset(self, positions):
        return _Data([self.records[i] for i in positions])


class _Predictor:
    def __init__(self):
        self.chunks = []

    def predict(self, chunk, use_metadata_parts):
        self.chunks.append([r.study for r in chunk.records])
        return [r.path for r in chunk.records]


def test_a_chunk_grows_to_the_end_of_its_study_and_every_image_is_predicted_once():
    studies = ["a", "a", "a", "b", "b", None, None, "c", "c", "c", "c"]
    records = [Record(f"img{i}.png", study=s) for i, s in enumerate(studies)]
    predictor = _Predictor()
    out = _predict_chunks(predictor, _Data(records), batch_size=2, progress=False, use_metadata_parts=True)
    assert out == [r.path for r in records]
    assert predictor.chunks == [["a", "a", "a"], ["b", "b"], [None, None], ["c", "c", "c", "c"]]
    assert all(len(set(c)) == 1 for c in predictor.chunks if c[0] is not None)
    assert np.sum([len(c) for c in predictor.chunks]) == len(records)

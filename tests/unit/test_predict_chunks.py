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
        self.stage2_seen = 0

    def predict(self, chunk, use_metadata_parts, stage2_data=None):
        self.chunks.append([r.study for r in chunk.records])
        if stage2_data is not None:   # stage 2's films (stage2.size) come in the same chunks
            assert [r.path for r in stage2_data.records] == [r.path for r in chunk.records]
            self.stage2_seen += len(stage2_data)
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


def test_stage2_films_are_chunked_with_their_records():
    records = [Record(f"img{i}.png", study=s) for i, s in enumerate(["a", "a", "b", "c", "c", "c"])]
    predictor = _Predictor()
    out = _predict_chunks(predictor, _Data(records), batch_size=2, progress=False, use_metadata_parts=True,
                          stage2_data=_Data(list(records)))
    assert out == [r.path for r in records] and predictor.stage2_seen == len(records)

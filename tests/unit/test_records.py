"""Records: study numbering for study-level clustering."""

from __future__ import annotations

from bonecluster.data.records import Record


def test_study_index_numbers_studies_in_order_and_isolates_images_without_one():
    from bonecluster.data.records import study_index

    recs = [Record("a.png", study="s2"), Record("b.png", study="s1"), Record("c.png", study="s2"),
            Record("d.png"), Record("e.png")]
    assert study_index(recs).tolist() == [0, 1, 0, 2, 3]


def test_study_means_are_unit_length_means():
    import torch

    from bonecluster.cluster import study_means

    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    means = study_means(x, torch.tensor([0, 0, 1]))
    assert torch.allclose(means, torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5], [0.6, 0.8]]))

"""Study mates: another film of the same study, as a label-free positive for two-view training.

A radiographic study shows one body part, usually in two or three views (MURA: AP and lateral).
Two films of one study are therefore the same part seen differently, a pair that no pixel
augmentation makes. Using patient metadata to choose contrastive positives is MedAug (Vu et al.
2021, MLHC); here the pair is two films of one study, so the network is pushed to ignore the
view and keep the part. Only the equality of study ids is read, never a label.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["StudyMates"]


class StudyMates:
    """For each dataset position, the other positions of its study.

    ``studies`` is ``(N,)`` int64 study numbers, as
    ``bonecluster.data.records.study_index(records)`` gives them; a film alone in its study has
    no mate and is always its own partner.
    """

    def __init__(self, studies: np.ndarray | torch.Tensor) -> None:
        studies = torch.as_tensor(np.asarray(studies), dtype=torch.int64)
        self.order = torch.argsort(studies, stable=True)            # positions grouped by study
        _, counts = torch.unique_consecutive(studies[self.order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(len(counts)), counts)
        self.start = torch.empty_like(studies)                        # (N,) first slot of the study
        self.size = torch.empty_like(studies)                         # (N,) films in the study
        self.rank = torch.empty_like(studies)                         # (N,) own slot within it
        self.start[self.order] = starts[group]
        self.size[self.order] = counts[group]
        self.rank[self.order] = torch.arange(len(studies)) - starts[group]

    @property
    def films_with_mates(self) -> int:
        """How many films share their study with at least one other film."""
        return int((self.size >= 2).sum())

    def partners(self, positions: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        """``(B,)`` partner of each position: with probability ``p`` a uniformly drawn *other*
        film of its study (when it has one), else the position itself.

        Always draws two ``(B,)`` uniforms from ``generator``, whatever ``p`` and the studies, so a
        run's later random numbers do not depend on how many films have mates.
        """
        positions = torch.as_tensor(positions, dtype=torch.int64)
        coin = torch.rand(len(positions), generator=generator, dtype=torch.float64)
        pick = torch.rand(len(positions), generator=generator, dtype=torch.float64)
        size, rank = self.size[positions], self.rank[positions]
        others = (size - 1).clamp(min=1)
        slot = (pick * others).long().clamp(max=others - 1)          # 0 .. size-2
        slot = slot + (slot >= rank).long()                          # skip the film itself
        mate = self.order[self.start[positions] + slot.clamp(max=size - 1)]
        swap = (coin < p) & (size >= 2)
        return torch.where(swap, mate, positions)

"""Which images belong to which body part in stage 2 (read by training and by the viewer)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from bonecluster.data.cache import PreparedDataset


def group_by_part(data: PreparedDataset, stage1_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Positions of each part's images: metadata body part first, else the stage-1 cluster name."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(data.records):
        name = rec.body_part or (stage1_names[i] if stage1_names is not None else None)
        if name is None:
            raise ValueError(f"{rec.path}: no body part in the metadata and no stage-1 run to name it; "
                             "train stage 1 first (--stages 1,2)")
        groups[name].append(i)
    return {name: np.asarray(pos, np.int64) for name, pos in sorted(groups.items())}

"""SimCLR pre-training, then the DeepCluster rounds from those weights.

Both phases count in the epoch numbers: ``selfsup.epochs`` SimCLR epochs, then
``train.epochs`` DeepCluster rounds (metrics.csv's ``phase`` tells them apart).
"""

from __future__ import annotations

from bonecluster.methods._base import register
from bonecluster.methods.deepcluster import DeepCluster
from bonecluster.methods.simclr import SimCLR


@register("simclr-deepcluster")
class SimCLRDeepCluster(SimCLR, DeepCluster):
    """SimCLR's pre-training epochs and head, DeepCluster's rounds and optimiser (by inheritance).

    Method resolution order: SimCLRDeepCluster, SimCLR, TwoViewPretraining, DeepCluster, Method.
    Each ``__init__``/``state_dict``/``load_state_dict`` calls ``super()``, so both parents' parts
    are built, saved and restored; SimCLR defines no rounds, so ``cluster_epochs`` and
    ``cluster_epoch`` come from DeepCluster.
    """

"""SeLa: DeepCluster's rounds with balanced Sinkhorn pseudo-labels and the centroid head.

k-means is run as in DeepCluster, then its assignments are replaced by equal-size ones:
Sinkhorn-Knopp over the cosine to the centroids (SeLa, Asano et al. 2020, §3.1; SwAV, Caron
et al. 2020, §3.1), the guard against one cluster swallowing the data. Each round's top layer
starts from the centroid classifier (DeepCluster-v2). The final clusters are balanced too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bonecluster.cluster import KMeansResult, summarise_clusters
from bonecluster.methods._base import register
from bonecluster.methods.deepcluster import DeepCluster
from bonecluster.selfsup import sinkhorn_balanced


@register("sela")
class SeLa(DeepCluster):
    """DeepCluster with balanced pseudo-labels (every round and the final clusters) and the centroid head."""

    centroid_top_layer = True

    def cluster_points(self, points: torch.Tensor, k: int, seeds: list[int]) -> KMeansResult:
        return balanced(points, super().cluster_points(points, k, seeds), k, self.cfg.cluster.sinkhorn_epsilon)


def balanced(x: torch.Tensor, km: KMeansResult, k: int, epsilon: float) -> KMeansResult:
    """Replace k-means' assignments on ``x`` (N, d) by balanced ones (Sinkhorn over cosine to the
    centroids) and its centroids by the means of the balanced clusters, so nearest-centroid
    prediction follows."""
    centroids = F.normalize(km.centroids.to(x.device, torch.float32), dim=1)
    labels = sinkhorn_balanced(x @ centroids.T, epsilon=epsilon).argmax(dim=1)
    return summarise_clusters(x, labels, k, fallback=centroids, n_splits=km.n_splits, backend=km.backend)

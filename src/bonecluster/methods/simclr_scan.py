"""SimCLR pre-training, then SCAN's neighbour-consistency clustering on the frozen features.

SCAN (Van Gansbeke et al. 2020, §2.2; :mod:`bonecluster.scan`) trains a classifier to give an
image and its nearest neighbours the same cluster. It sees ``scan.views`` augmented copies of
each image (``train.augment``), embedded in the same PCA-whitened space as the clean features.
Its clusters are summarised by their means, so prediction stays nearest-centroid.
"""

from __future__ import annotations

import logging

import torch

from bonecluster import distributed as dist
from bonecluster.cluster import KMeansResult, PCAWhitening, l2_normalise, preprocess_features, summarise_clusters
from bonecluster.data.cache import PreparedDataset
from bonecluster.methods._base import epoch_generator, register
from bonecluster.methods.simclr import SimCLR
from bonecluster.scan import scan_cluster

log = logging.getLogger("bonecluster")


@register("simclr-scan")
class SimCLRScan(SimCLR):
    """SimCLR's pre-training; SCAN instead of k-means for the final clusters."""

    def final_clusters(self, data: PreparedDataset, seed_offset: int) -> tuple[KMeansResult, PCAWhitening]:
        """PCA-whiten the clean features, embed the augmented views in the same space, train
        SCAN's classifier on rank 0 and broadcast its labels."""
        loop, c, sc = self.loop, self.cfg.cluster, self.cfg.scan
        x, pca = preprocess_features(loop.extract(data), dim=c.pca_dim, eigen_power=c.eigen_power)
        views = []
        for v in range(sc.views):
            gen = epoch_generator(self.cfg.seed, v, stream=2)
            local = loop.forward_all(data, f"scan view {v + 1}", keep=True, generator=gen)
            views.append(l2_normalise(pca.transform(dist.gather_shards(local, len(data), loop.dist))))
        if loop.dist.is_main:
            result = scan_cluster(x, torch.stack(views), c.k, n_neighbours=sc.neighbours, epochs=sc.epochs,
                                  batch_size=sc.batch_size, lr=sc.lr, entropy_weight=sc.entropy_weight,
                                  heads=sc.heads, seed=self.cfg.seed)
            log.info("SCAN: head %d kept, loss %.4f", result.head, result.loss)
            labels = result.assignments.to(loop.device)
        else:
            labels = torch.empty(len(x), dtype=torch.int64, device=loop.device)
        labels = dist.broadcast(labels, loop.dist)
        return summarise_clusters(x, labels, c.k), pca

"""SimCLR: contrastive pre-training (Chen et al. 2020), then k-means once on its features.

Two augmented views of an image attract and every other image of the batch repels (NT-Xent,
eq. 1) through a projection head that is dropped afterwards. ``selfsup.epochs=0`` with
``model.weights`` clusters a given network's features without training ("pretrained backbone +
k-means").
"""

from __future__ import annotations

import torch

from bonecluster.methods._base import register
from bonecluster.methods._two_view import TwoViewPretraining
from bonecluster.selfsup import ProjectionHead, nt_xent


@register("simclr")
class SimCLR(TwoViewPretraining):
    """NT-Xent on two views through a ProjectionHead; k-means once afterwards."""

    phase = "simclr"
    multi_crop = True

    def make_head(self) -> torch.nn.Module:
        s = self.cfg.selfsup
        return ProjectionHead(self.loop.model.feature_dim, s.hidden_dim, s.proj_dim)

    def view_loss(self, views: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        n = len(out) // 2
        return nt_xent(out[:n], out[n:], self.cfg.selfsup.temperature)

    def local_loss(self, out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor:
        """Multi-crop NT-Xent (SwAV s3.2 with SimCLR's loss): the two full-size views' pair and every
        (small view, full-size view) pair, each an NT-Xent over the batch, averaged with equal weights.

        ``out``: ``(2N, D)``, rows i and N + i the two full-size views of image i; ``local_out``:
        ``(L * N, D)``, row l * N + i the l-th small view of image i.
        """
        n, tau = len(out) // 2, self.cfg.selfsup.temperature
        full = (out[:n], out[n:])
        terms = [nt_xent(full[0], full[1], tau)]
        terms += [nt_xent(small, view, tau) for small in local_out.split(n) for view in full]
        return torch.stack(terms).mean()

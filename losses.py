"""Training objectives of GFlowGR and its baselines.

Paper Sec. 2, Eq. (1): the next-token (SFT) loss of generative recommendation,
    L_GR(U, v) = - sum_{l=1}^{L} log P_GR(t_l | U, t_{<l}).
Here P_GR is the trie-masked policy P_F (`gflowgr.GRModel.masked_log_pf`): the same
distribution beam search decodes from and the GFlowNet losses (Eq. 5-8) train.

Usage: `loss = gr_loss(log_pf)` with `log_pf, _ = model(hist, hist_len, targets)`
"""
from __future__ import annotations

import torch


def gr_loss(log_pf: torch.Tensor) -> torch.Tensor:
    """Eq. (1) averaged over the batch. log_pf: (B, L) per-step log P_F of the observed ID -> scalar."""
    # Eq. (1): L_GR = - sum_l log P_GR(t_l | U, t_{<l})
    return -log_pf.sum(1).mean()

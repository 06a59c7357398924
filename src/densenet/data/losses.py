"""The binary and multi-label loss: BCE with logits, taking the targets as a Split stores them.

``Task.loss`` (densenet.data.task) chooses it; kept apart so that reading a task needs no torch.
"""

from __future__ import annotations

import torch


class BCEWithLogits(torch.nn.BCEWithLogitsLoss):
    """``BCEWithLogitsLoss`` on binary targets int64 (N,) against logits (N, 1), or multi-label float32 (N, L)
    targets; ``pos_weight`` (one per output) is a buffer, so ``.to(device)`` moves it with the module."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.float(), targets.to(torch.float32).reshape(logits.shape))

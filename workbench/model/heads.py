"""CTC head and mode (silent vs vocalised) head on the encoder output (modessm.md 1.4, 1.5)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from workbench.model.init import xavier_linear_


class CTCHead(nn.Module):
    """Dropout + Linear(d_model -> V), xavier weights and zero bias as in the seed.

    Args:
        d_model (int): encoder width d. n_classes (int): vocabulary size V incl. blank. dropout (float): rate.
    """

    def __init__(self, d_model: int, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, n_classes)
        xavier_linear_(self.proj)

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        """
        Args:
            encoded (Tensor): (B, T, d).

        Returns:
            Tensor: (B, T, V) unnormalised logits.
        """
        return self.proj(self.dropout(encoded))


class ModeHead(nn.Module):
    """Masked mean pooling over valid frames -> MLP (Linear-ReLU-Dropout x2) -> Linear -> mode logits.

    The seed's contrastive projection (used only by its SupCon term, which never had labels) is not built.

    Args:
        d_model (int): encoder width d. hidden (sequence of 2 ints): MLP widths (the seed's (256, 128)).
        n_classes (int): number of modes (2). dropout (float): rate after each MLP layer.
    """

    def __init__(self, d_model: int, hidden: Sequence[int] = (256, 128), n_classes: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        h1, h2 = hidden
        self.mlp = nn.Sequential(
            nn.Linear(d_model, h1), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(h1, h2), nn.ReLU(), nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(h2, n_classes)
        xavier_linear_(self)

    def forward(self, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            encoded (Tensor): (B, T, d). mask (Tensor): (B, T) bool, True on valid frames.

        Returns:
            Tensor: (B, n_classes) logits.
        """
        valid = mask.unsqueeze(-1)
        # clamp(min=1) as in the seed: an all-padding row pools to zero instead of dividing by zero. The sum over
        # up to ~1000 frames is taken in float32 so that it cannot overflow float16 under autocast.
        frames = valid.sum(dim=1).clamp(min=1).float()
        pooled = encoded.float().masked_fill(~valid, 0.0).sum(dim=1) / frames
        return self.classifier(self.mlp(pooled))

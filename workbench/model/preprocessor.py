"""Neural-feature preprocessor (modessm.md 1.2): normalise, gate channels, local temporal context, project."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.model.init import xavier_linear_


class Preprocessor(nn.Module):
    r"""BatchNorm1d -> channel gate -> depthwise Conv1d + ReLU with residual -> Linear -> LayerNorm -> Dropout.

    .. math::
        x_n = \mathrm{BN}(x) \odot m, \quad g = \sigma(W_2\,\mathrm{ReLU}(W_1\,\bar{x}_n)), \quad
        x_g = x_n \odot g, \quad r = x_g + \mathrm{ReLU}(\mathrm{DWConv}_k(x_g)), \quad
        y = \mathrm{Dropout}(\mathrm{LN}(W_p r)) \odot m

    where :math:`m` is the padding mask and :math:`\bar{x}_n` the mean over the valid frames.

    BatchNorm statistics in training mode are taken over all B x T frames, **including zero padding**, exactly
    as in the seed (it passes no mask); the running statistics therefore depend on how much padding a batch has.
    Padded frames are set to zero right after the normalisation, so the channel-gate pooling (over valid frames
    only, where the seed pooled over the padded length too) and the 'same'-padded convolution see zeros there.
    There is no time downsampling: output frame t is input frame t.

    Args:
        n_channels (int): input features per frame, C.
        d_model (int): output width, d.
        reduction (int): channel-gate bottleneck ratio (C -> C / reduction -> C).
        kernel_size (int): odd kernel of the depthwise temporal convolution.
        dropout (float): dropout rate after the LayerNorm.
    """

    def __init__(self, n_channels: int, d_model: int, *, reduction: int = 16, kernel_size: int = 7,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.n_channels = n_channels
        self.norm = nn.BatchNorm1d(n_channels, momentum=0.1)
        self.gate = nn.Sequential(
            nn.Linear(n_channels, n_channels // reduction),
            nn.ReLU(),
            nn.Linear(n_channels // reduction, n_channels),
            nn.Sigmoid(),
        )
        self.conv = nn.Conv1d(n_channels, n_channels, kernel_size, padding=kernel_size // 2, groups=n_channels)
        self.proj = nn.Linear(n_channels, d_model)
        self.layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        xavier_linear_(self.proj)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features (Tensor): (B, T, C) input features, zero-padded.
            mask (Tensor): (B, T) bool, True on valid frames.

        Returns:
            Tensor: (B, T, d); padded frames are zero.
        """
        if features.size(-1) != self.n_channels:
            raise ValueError(f"expected {self.n_channels} input channels, got {features.size(-1)}")
        valid = mask.unsqueeze(-1)
        x = self.norm(features.transpose(1, 2)).transpose(1, 2)
        x = x.masked_fill(~valid, 0.0)
        frames = valid.sum(dim=1).clamp(min=1).to(x.dtype)
        x = x * self.gate(x.sum(dim=1) / frames).unsqueeze(1)
        x = x + F.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        x = self.dropout(self.layer_norm(self.proj(x)))
        return x.masked_fill(~valid, 0.0)

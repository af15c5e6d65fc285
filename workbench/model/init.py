"""The seed's initialisation of linear layers, shared by every module that uses it."""

import torch.nn as nn


def xavier_linear_(module: nn.Module) -> None:
    """xavier_uniform weights and zero biases for every nn.Linear in `module` (itself included)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

"""The CTC + RNN-T hybrid: preprocessor -> bidirectional SSM encoder -> {CTC head, RNN-T decoder, mode head}."""

from __future__ import annotations

import torch
import torch.nn as nn

from workbench.model.config import ModelConfig
from workbench.model.heads import CTCHead, ModeHead
from workbench.model.init import xavier_linear_
from workbench.model.preprocessor import Preprocessor
from workbench.model.rnnt import RNNTDecoder
from workbench.model.ssm import Encoder


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(parameter tensors, elements) of `module`, trainable or not."""
    params = list(module.parameters())
    return len(params), sum(p.numel() for p in params)


class HybridModel(nn.Module):
    """MODE-SSM style hybrid with children `preprocessor`, `encoder`, `ctc_head`, `rnnt_decoder`, `mode_head`.

    Initialisation follows the seed: each sub-module initialises itself, then (with `cfg.reinit_linear`) every
    nn.Linear is re-initialised with xavier_uniform / zero bias, the SSM's dt_proj included (see ModelConfig).
    Every nn.Embedding gets N(0, 0.02) and every LayerNorm/BatchNorm weight 1 / bias 0, as the seed's
    model-level pass does. Conv1d, LSTM, A_log and D keep their own init.

    Args:
        cfg (ModelConfig): sizes and options; stored as `self.cfg`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.preprocessor = Preprocessor(cfg.n_channels, cfg.d_model, reduction=cfg.channel_gate_reduction,
                                         kernel_size=cfg.conv_kernel, dropout=cfg.dropout)
        self.encoder = Encoder(cfg.d_model, cfg.n_layers, cfg.d_state, cfg.d_conv, cfg.expand, cfg.resolved_dt_rank,
                               cfg.dropout)
        self.ctc_head = CTCHead(cfg.d_model, cfg.n_classes, cfg.dropout)
        self.rnnt_decoder = self._new_decoder()
        self.mode_head = ModeHead(cfg.d_model, cfg.mode_hidden, cfg.mode_classes, cfg.dropout)
        self.apply(self._init_weights)

    def _new_decoder(self) -> RNNTDecoder:
        cfg = self.cfg
        return RNNTDecoder(cfg.d_model, cfg.n_classes, cfg.predictor_dim, cfg.predictor_layers, cfg.joint_dim,
                           cfg.blank, cfg.dropout)

    def reset_decoder(self, seed: int) -> None:
        """Give the RNN-T decoder a fresh initialisation drawn from `seed`, exactly as construction initialises it
        (its own init, then the model-level pass); the rest of the model and torch's RNG state are untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self._new_decoder()
            fresh.apply(self._init_weights)
        self.rnnt_decoder.load_state_dict(fresh.state_dict())

    def param_groups(self) -> dict[str, str]:
        """The parameter groups the instruments report by: each component, each encoder layer, and the
        decoder's predictor and joint network (group name -> parameter-name prefix)."""
        names = ["preprocessor", "encoder"] + [f"encoder.layers.{i}" for i in range(len(self.encoder.layers))]
        names += ["ctc_head", "rnnt_decoder.predictor", "rnnt_decoder.joint", "mode_head"]
        return {name: name for name in names}

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and self.cfg.reinit_linear:
            xavier_linear_(module)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        features: torch.Tensor,
        feature_lengths: torch.Tensor,
        targets: torch.Tensor | None = None,
        target_lengths: torch.Tensor | None = None,
        *,
        rnnt: bool = True,
        mode: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """
        Args:
            features (Tensor): (B, T, C) float32, zero-padded.
            feature_lengths (Tensor): (B,) int64 valid frames.
            targets (Tensor or None): (B, U) int64 labels, zero-padded.
            target_lengths (Tensor or None): (B,) int64; not needed by the forward pass (the predictor is causal
                in u, so padding never reaches valid positions), accepted so callers can pass a batch as is.
            rnnt (bool): compute the joint logits (needs `targets`).
            mode (bool): compute the mode logits.

        Returns:
            dict: ``encoded`` (B, T, d), zero at padded frames; ``lengths`` (B,) output frames (= input frames, no
            downsampling); ``ctc_logits`` (B, T, V); ``rnnt_logits`` (B, T, U + 1, V) or None when `rnnt` is False
            or `targets` is None; ``mode_logits`` (B, mode_classes) or None when `mode` is False.
        """
        if features.dim() != 3 or feature_lengths.shape != features.shape[:1]:
            raise ValueError(f"expected features (B, T, C) and lengths (B,), got {tuple(features.shape)} and "
                             f"{tuple(feature_lengths.shape)}")
        mask = torch.arange(features.size(1), device=features.device) < feature_lengths.to(features.device)[:, None]
        x = self.preprocessor(features, mask)
        encoded = self.encoder(x, feature_lengths, mask)
        rnnt_logits = self.rnnt_decoder(encoded, targets) if rnnt and targets is not None else None
        return {
            "encoded": encoded,
            "lengths": feature_lengths,
            "ctc_logits": self.ctc_head(encoded),
            "rnnt_logits": rnnt_logits,
            "mode_logits": self.mode_head(encoded, mask) if mode else None,
        }

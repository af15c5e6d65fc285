"""Model configuration and size presets for the MODE-SSM style CTC + RNN-T hybrid (modessm.md 1.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass
class ModelConfig:
    """Hyper-parameters of `HybridModel`. The defaults are the seed's sizes (the `seed` preset).

    n_channels: input features per frame (512 for the Brain-to-Text '25 data).
    n_classes: output vocabulary including blank (41: blank, 39 phonemes, silence 40).
    blank: blank index, shared by CTC and RNN-T; it also serves as the predictor's start symbol.
    d_model: encoder width. Each bidirectional layer runs two SSM blocks of width d_model / 2.
    n_layers: bidirectional encoder layers.
    d_state, d_conv, expand: selective-SSM state size, causal conv width and inner expansion.
    dt_rank: rank of the dt projection; "auto" is ceil(width / 16) for the SSM block's width (16 for the seed).
    predictor_dim, predictor_layers: RNN-T prediction network (Embedding + LSTM) width and depth.
    joint_dim: width of the joint network.
    dropout: one rate for every dropout, as in the seed (its dataclass defaults are all 0.1).
    mode_classes, mode_hidden: mode head (silent vs vocalised) output classes and MLP widths.
    channel_gate_reduction: bottleneck ratio of the preprocessor's channel gate.
    conv_kernel: kernel of the preprocessor's depthwise temporal convolution.
    reinit_linear: re-initialise every nn.Linear with xavier_uniform and zero bias after the sub-modules have
        initialised themselves, as the seed's `MODESSMModel.apply(_init_weights)` does (modessm.md 1.7). That also
        covers the SSM's dt_proj, whose bias becomes 0, so dt = softplus(0) ~= 0.69 at init instead of Mamba's
        1e-3..0.1 (7-700x larger steps, much shorter memory). False keeps each sub-module's own init.
    """

    n_channels: int = 512
    n_classes: int = 41
    blank: int = 0
    d_model: int = 512
    n_layers: int = 8
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    predictor_dim: int = 512
    predictor_layers: int = 2
    joint_dim: int = 512
    dropout: float = 0.1
    mode_classes: int = 2
    mode_hidden: tuple[int, int] = (256, 128)
    channel_gate_reduction: int = 16
    conv_kernel: int = 7
    reinit_linear: bool = True

    def __post_init__(self) -> None:
        if self.d_model % 2:
            raise ValueError(f"d_model: expected an even width (two SSM halves), got {self.d_model}")
        if not 0 <= self.blank < self.n_classes:
            raise ValueError(f"blank: expected an index in [0, {self.n_classes}), got {self.blank}")
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank <= 0):
            raise ValueError(f"dt_rank: expected 'auto' or a positive int, got {self.dt_rank!r}")
        if self.n_channels % self.channel_gate_reduction:
            raise ValueError(f"channel_gate_reduction {self.channel_gate_reduction} must divide "
                             f"n_channels {self.n_channels}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel: expected an odd kernel ('same' padding), got {self.conv_kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {self.dropout}")
        self.mode_hidden = tuple(self.mode_hidden)

    @property
    def ssm_width(self) -> int:
        """Width of each direction's SSM block (half of d_model)."""
        return self.d_model // 2

    @property
    def resolved_dt_rank(self) -> int:
        """dt_rank with "auto" resolved as Mamba does: ceil(block width / 16)."""
        return math.ceil(self.ssm_width / 16) if self.dt_rank == "auto" else int(self.dt_rank)


def _scaled_mode_hidden(d_model: int) -> tuple[int, int]:
    """The seed's (256, 128) mode-head MLP scaled with d_model / 512."""
    return (d_model // 2, d_model // 4)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=32, n_layers=1, d_state=8, predictor_dim=32, predictor_layers=1, joint_dim=16,
                        mode_hidden=_scaled_mode_hidden(32)),
    "small": ModelConfig(d_model=128, n_layers=2, d_state=16, predictor_dim=128, predictor_layers=1, joint_dim=64,
                         mode_hidden=_scaled_mode_hidden(128)),
    "seed": ModelConfig(),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A copy of preset `name` with `overrides` applied, e.g. `get_config("small", dropout=0.0)`."""
    if name not in PRESETS:
        raise ValueError(f"model preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid: {', '.join(sorted(known))}")
    return replace(PRESETS[name], **overrides)

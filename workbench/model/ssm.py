"""Selective state-space encoder (Mamba-style, plain torch) with a padding-correct bidirectional layer.

Follows modessm.md 1.3: each encoder layer projects to d, runs a forward SSM block on one half of the channels and
a backward SSM block on the other half, and projects the concatenation back to d.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor) -> torch.Tensor:
    r"""Selective scan (Mamba S6 recurrence) in float32.

    .. math::
        h_t = \exp(\Delta_t A) \odot h_{t-1} + \Delta_t\, B_t\, u_t, \qquad y_t = C_t \cdot h_t + D \odot u_t,
        \qquad h_{-1} = 0

    with :math:`\Delta_t \ge 0` and :math:`A \le 0`, so every exponent is non-positive and every decay factor lies
    in [0, 1]: the recurrence cannot overflow for any length (unlike closed forms that divide by exp(cumsum)).
    A step with :math:`\Delta_t = 0` leaves the state unchanged (decay 1, input 0); callers use this to stop
    padded frames from updating the state. The scan runs in float32 with autocast disabled, as Mamba's kernel
    does: in float16, decay products underflow and a state summed over hundreds of frames loses its precision.

    Args:
        u (Tensor): (batch, time, d_inner) input.
        dt (Tensor): (batch, time, d_inner) step sizes, non-negative.
        A (Tensor): (d_inner, d_state) state matrix (diagonal per channel), non-positive.
        B (Tensor): (batch, time, d_state) input projection.
        C (Tensor): (batch, time, d_state) output projection.
        D (Tensor): (d_inner,) skip connection.

    Returns:
        Tensor: (batch, time, d_inner) float32 output.
    """
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, dt, A, B, C, D = (t.float() for t in (u, dt, A, B, C, D))
        decay = torch.exp(dt.unsqueeze(-1) * A)  # (batch, time, d_inner, d_state)
        drive = (dt * u).unsqueeze(-1) * B.unsqueeze(2)  # (batch, time, d_inner, d_state)
        h = u.new_zeros(u.size(0), u.size(2), A.size(1))
        ys = []
        # unbind, not indexing: the backward of T unbound views is one stack, whereas the backward of T index
        # views materialises a full-size zero gradient per step (quadratic in T).
        for decay_t, drive_t, c_t in zip(decay.unbind(1), drive.unbind(1), C.unsqueeze(-1).unbind(1)):
            h = torch.addcmul(drive_t, decay_t, h)
            ys.append(torch.bmm(h, c_t))
        return torch.cat(ys, dim=-1).transpose(1, 2) + u * D


class SelectiveSSM(nn.Module):
    """Mamba block on width d: gated, causal-conv, input-dependent (selective) diagonal SSM.

    in_proj (d -> 2 d_inner, no bias) splits into x and gate z; x -> depthwise causal Conv1d(d_conv) -> SiLU;
    x_proj (d_inner -> dt_rank + 2 d_state, no bias) gives dt, B, C; dt_proj (dt_rank -> d_inner) -> softplus;
    A = -exp(A_log); y = selective_scan(...) * SiLU(z); out_proj (d_inner -> d, no bias).

    Initialisation is Mamba's: A_log = log(1..d_state) per channel, D = 1, dt_proj weight U(+-dt_rank^-0.5) and
    bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (floored at dt_init_floor). A model-level
    `reinit_linear` pass (see ModelConfig) overrides the Linear layers, dt_proj included.

    Args:
        d_model (int): block width d.
        d_state (int): state size per channel.
        d_conv (int): causal convolution width.
        expand (int): d_inner = expand * d.
        dt_rank (int): rank of the dt projection.
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dt_rank: int, *,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, padding=d_conv - 1, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        with torch.no_grad():
            std = dt_rank ** -0.5
            self.dt_proj.weight.uniform_(-std, std)
            log_dt = torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            dt = torch.exp(log_dt).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    @property
    def A(self) -> torch.Tensor:
        """(d_inner, d_state) negative state matrix."""
        return -torch.exp(self.A_log)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x (Tensor): (B, T, d) input.
            mask (Tensor or None): (B, T) bool, True on valid frames; padded frames neither feed the convolution
                nor update the SSM state (their dt is zero).

        Returns:
            Tensor: (B, T, d). Values at padded frames are unspecified.
        """
        T = x.size(1)
        u, z = self.in_proj(x).chunk(2, dim=-1)
        if mask is not None:
            u = u.masked_fill(~mask.unsqueeze(-1), 0.0)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :T].transpose(1, 2))
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        if mask is not None:
            dt = dt.masked_fill(~mask.unsqueeze(-1), 0.0)
        y = selective_scan(u, dt, self.A, B, C, self.D)
        return self.out_proj(y * F.silu(z))


class MambaBlock(nn.Module):
    """Pre-LayerNorm residual block: x + SelectiveSSM(LN(x)).

    Args:
        d_model (int): block width d; the remaining arguments are SelectiveSSM's.
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dt_rank: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.ssm = SelectiveSSM(d_model, d_state, d_conv, expand, dt_rank)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x (Tensor): (B, T, d). mask (Tensor or None): (B, T) bool, True on valid frames.

        Returns:
            Tensor: (B, T, d).
        """
        return x + self.ssm(self.norm(x), mask)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence within its own length; padded frames stay where they are.

    Applying it twice gives back the input.

    Args:
        x (Tensor): (B, T, ...) right-padded batch.
        lengths (Tensor): (B,) valid lengths.

    Returns:
        Tensor: (B, T, ...) with x[b, :lengths[b]] reversed.
    """
    t = torch.arange(x.size(1), device=x.device)
    n = lengths.to(x.device).unsqueeze(1)
    index = torch.where(t < n, n - 1 - t, t)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class BidirectionalLayer(nn.Module):
    """input_proj (d -> d) -> halves -> forward MambaBlock(d/2) | backward MambaBlock(d/2) -> concat -> output_proj.

    The backward block reads each sequence reversed within its own length. The seed instead flips the whole
    padded tensor (`torch.flip(x, dims=[1])`), so its backward direction consumes T_max - T_i padding frames
    before the real ones and a sequence's output depends on how much padding its batch has; here it does not.
    As in the seed there is no residual around the layer (only inside each half-block).

    Args:
        d_model (int): layer width d (even); the remaining arguments configure both SSM blocks.
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dt_rank: int) -> None:
        super().__init__()
        half = d_model // 2
        self.input_proj = nn.Linear(d_model, d_model)
        self.forward_block = MambaBlock(half, d_state, d_conv, expand, dt_rank)
        self.backward_block = MambaBlock(half, d_state, d_conv, expand, dt_rank)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): (B, T, d). lengths (Tensor): (B,) valid lengths. mask (Tensor): (B, T) bool valid frames.

        Returns:
            Tensor: (B, T, d).
        """
        fwd, bwd = self.input_proj(x).chunk(2, dim=-1)
        fwd = self.forward_block(fwd, mask)
        bwd = reverse_padded(self.backward_block(reverse_padded(bwd, lengths), mask), lengths)
        return self.output_proj(torch.cat([fwd, bwd], dim=-1))


class Encoder(nn.Module):
    """n_layers BidirectionalLayer with dropout between layers (not after the last), final LayerNorm, masked output.

    Padded frames are zeroed after every layer so that nothing large accumulates where no loss looks.

    Args:
        d_model (int): width d. n_layers (int): number of layers. dropout (float): rate between layers.
        d_state, d_conv, expand, dt_rank: SSM settings of every block.
    """

    def __init__(self, d_model: int, n_layers: int, d_state: int, d_conv: int, expand: int, dt_rank: int,
                 dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            BidirectionalLayer(d_model, d_state, d_conv, expand, dt_rank) for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): (B, T, d). lengths (Tensor): (B,) valid lengths. mask (Tensor): (B, T) bool valid frames.

        Returns:
            Tensor: (B, T, d), zero at padded frames.
        """
        valid = mask.unsqueeze(-1)
        for i, layer in enumerate(self.layers):
            x = layer(x, lengths, mask).masked_fill(~valid, 0.0)
            if i < len(self.layers) - 1:
                x = self.dropout(x)
        return self.norm(x).masked_fill(~valid, 0.0)

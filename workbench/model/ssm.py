"""Selective state-space encoder (Mamba-style, plain torch) with a padding-correct bidirectional layer.

Follows modessm.md 1.3: each encoder layer projects to d, runs a forward SSM block on one half of the channels and
a backward SSM block on the other half, and projects the concatenation back to d.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_LOG2E = math.log2(math.e)
# Elements of one (block, batch, d_inner, d_state) work tensor when `block` is left to the scan: 4 MiB in float32,
# so the three that the backward streams through a dozen passes stay in cache. At the seed's widths on a 2-core
# EPYC (32 MiB L3), blocks of 4 or 8 steps ran fwd+bwd 3x faster than blocks of 64, and 16 was 25% slower than 8.
_BLOCK_ELEMENTS = 1 << 20
# The fused kernel's limit on d_state (mamba-ssm, csrc/selective_scan/selective_scan.cpp).
_MAMBA_MAX_D_STATE = 256
SCAN_IMPLS = ("auto", "chunked", "mamba", "reference")


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
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
        impl (str): "auto" (`auto_scan_impl`'s choice), "chunked" (`selective_scan_chunked`), "mamba"
            (`selective_scan_mamba`) or "reference" (`selective_scan_reference`).

    Returns:
        Tensor: (batch, time, d_inner) float32 output.
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(f"impl: expected one of {', '.join(SCAN_IMPLS)}, got {impl!r}")
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, dt, A, B, C, D = (t.float() for t in (u, dt, A, B, C, D))
        scan = {"chunked": selective_scan_chunked, "mamba": selective_scan_mamba,
                "reference": selective_scan_reference}[auto_scan_impl(u, A) if impl == "auto" else impl]
        return scan(u, dt, A, B, C, D)


def auto_scan_impl(u: torch.Tensor, A: torch.Tensor) -> str:
    """The implementation `selective_scan(impl="auto")` runs for these inputs.

    Args:
        u (Tensor): (batch, time, d_inner) input. A (Tensor): (d_inner, d_state) state matrix.

    Returns:
        str: "mamba" for CUDA inputs where mamba-ssm's kernel is importable and d_state <= 256, else "chunked".
    """
    if u.is_cuda and A.size(1) <= _MAMBA_MAX_D_STATE and _mamba_scan_fn() is not None:
        return "mamba"
    return "chunked"


@functools.cache
def _mamba_scan_fn() -> Callable[..., torch.Tensor] | None:
    """mamba-ssm's fused `selective_scan_fn`, or None where the package or its CUDA extension is missing."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def mamba_scan_available() -> bool:
    """Whether mamba-ssm's fused selective-scan kernel can be imported here."""
    return _mamba_scan_fn() is not None


def selective_scan_mamba(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: torch.Tensor) -> torch.Tensor:
    """The selective scan through mamba-ssm's fused CUDA kernel, in float32 with autocast disabled.

    Args:
        u, dt, A, B, C, D: as in `selective_scan`, on a CUDA device; d_state <= 256.

    Returns:
        Tensor: (batch, time, d_inner) float32 output.

    Raises:
        RuntimeError: where mamba-ssm is not installed.
    """
    scan = _mamba_scan_fn()
    if scan is None:
        raise RuntimeError("impl='mamba' needs the mamba-ssm package with its CUDA extension (pip install mamba-ssm)")
    with torch.autocast(device_type=u.device.type, enabled=False):
        # The kernel reads channels-first (batch, d_inner | d_state, time) with time contiguous.
        u, dt, B, C = (t.float().transpose(1, 2).contiguous() for t in (u, dt, B, C))
        return scan(u, dt, A.float().contiguous(), B, C, D.float()).transpose(1, 2)


def selective_scan_chunked(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: torch.Tensor, *, chunk: int = 64, block: int | None = None) -> torch.Tensor:
    r"""Selective scan in blocks and chunks with recomputation in backward, so memory has no time x d_state term.

    Same recurrence and contract as `selective_scan`. The forward walks the sequence in blocks of `block` steps:
    it forms the block's decays :math:`\exp(\Delta A)` and drives :math:`\Delta u B` as (block, batch, d_inner,
    d_state) tensors, runs the recurrence through them with one in-place multiply-add per step, takes the block's
    outputs in one batched product, and keeps only the state at the start of each `chunk` steps. The backward walks
    the chunks in reverse: from a chunk's saved state it recomputes the state at each of its block starts, then,
    block by block in reverse, recomputes decays and states, runs the adjoint recurrence
    :math:`\bar h_t = \bar y_t C_t + \exp(\Delta_{t+1} A) \odot \bar h_{t+1}` (the same decays, in reverse), and
    takes every gradient as a batched product over the block. Only decays in [0, 1] ever multiply, and nothing is
    divided, so no length overflows; a step with dt = 0 leaves the state unchanged.

    Memory beyond inputs, outputs and gradients: ceil(time / chunk) saved states of (batch, d_inner, d_state), which
    is about one (batch, time, d_inner) tensor's worth when chunk = d_state, plus ceil(chunk / block) block-start
    states and three (block, batch, d_inner, d_state) work tensors. Computes in float64 when an input is float64
    (for gradcheck), else in float32; autocast is disabled inside.

    Args:
        u, dt, A, B, C, D: as in `selective_scan`.
        chunk (int): steps between saved states. The time hardly depends on it (32, 64 and 128 within 5% of each
            other at the seed's widths); 64 keeps the saved states within one (batch, time, d_inner) tensor for
            d_state <= 64.
        block (int or None): steps per work tensor; None takes the most whose work tensor stays within 4 MiB of
            float32 (8 at the seed's widths and batch 4), capped at `chunk`.

    Returns:
        Tensor: (batch, time, d_inner) output.
    """
    if chunk < 1 or (block is not None and block < 1):
        raise ValueError(f"chunk and block: expected positive step counts, got {chunk} and {block}")
    if block is None:
        block = max(1, _BLOCK_ELEMENTS // max(1, u.size(0) * A.numel()))
    dtype = torch.float64 if torch.float64 in {t.dtype for t in (u, dt, A, B, C, D)} else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, dt, A, B, C, D = (t.to(dtype) for t in (u, dt, A, B, C, D))
        return _ChunkedScan.apply(u, dt, A, B, C, D, chunk, min(block, chunk))


def _spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) cut into consecutive (s, e) pieces of at most `step` steps."""
    return [(s, min(s + step, stop)) for s in range(start, stop, step)]


def _block_states(a_buf: torch.Tensor, h_buf: torch.Tensor, dt: torch.Tensor, x: torch.Tensor, B: torch.Tensor,
                  A2: torch.Tensor, h0: torch.Tensor, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decays and states of steps s..e-1, written into the work buffers.

    Args:
        a_buf, h_buf (Tensor): (block, batch, d_inner, d_state) work buffers, block >= e - s.
        dt, x (Tensor): (time, batch, d_inner) step sizes and dt * u, time-major.
        B (Tensor): (time, batch, d_state) input projection, time-major.
        A2 (Tensor): (d_inner, d_state) A * log2(e).
        h0 (Tensor): (batch, d_inner, d_state) state after step s - 1; not in h_buf.

    Returns:
        (Tensor, Tensor): (e - s, batch, d_inner, d_state) decays exp(dt A) and states h, views of the buffers.
    """
    steps = e - s
    # exp2 of a pre-scaled exponent: the same decay, and 2.5x faster than exp on CPU.
    a = torch.mul(dt[s:e].unsqueeze(-1), A2, out=a_buf[:steps]).exp2_()
    h = torch.mul(x[s:e].unsqueeze(-1), B[s:e].unsqueeze(-2), out=h_buf[:steps])
    prev = h0
    # One in-place multiply-add per step over (batch, d_inner, d_state). On CPU this beat a log-depth
    # (Hillis-Steele) scan over the block by 1.4x: that scan moves log2(block) times as much memory.
    for t in range(steps):
        prev = h[t].addcmul_(a[t], prev)
    return a, h


class _ChunkedScan(torch.autograd.Function):
    """`selective_scan_chunked`'s forward and hand-written backward; inputs already in one float dtype."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, chunk: int, block: int) -> torch.Tensor:
        (batch, T, d_inner), d_state = u.shape, A.size(1)
        # Time-major copies: a block is then a leading slice and a step a contiguous (batch, ...) slab.
        u, dt, B, C = (t.transpose(0, 1).contiguous() for t in (u, dt, B, C))
        x, A2 = dt * u, A * _LOG2E
        y = torch.empty_like(u)
        saved = u.new_empty(math.ceil(T / chunk), batch, d_inner, d_state)
        state = u.new_zeros(batch, d_inner, d_state)
        a_buf = u.new_empty(min(block, T), batch, d_inner, d_state)
        h_buf = torch.empty_like(a_buf)
        for k, start in enumerate(range(0, T, chunk)):
            saved[k].copy_(state)
            for s, e in _spans(start, min(start + chunk, T), block):
                _, h = _block_states(a_buf, h_buf, dt, x, B, A2, state, s, e)
                m = (e - s) * batch
                # (1, d_state) @ (d_state, d_inner) per step and sequence: the other orientation is 4x slower.
                torch.bmm(C[s:e].view(m, 1, -1), h.view(m, d_inner, -1).transpose(1, 2), out=y[s:e].view(m, 1, -1))
                state.copy_(h[-1])
        ctx.save_for_backward(u, dt, x, A, B, C, D, saved)
        ctx.chunk, ctx.block = chunk, block
        return torch.addcmul(y, u, D).transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, dt, x, A, B, C, D, saved = ctx.saved_tensors
        chunk, block = ctx.chunk, ctx.block
        T, batch, d_inner = u.shape
        d_state = A.size(1)
        with torch.autocast(device_type=u.device.type, enabled=False):
            gy = grad_y.transpose(0, 1).contiguous().to(u.dtype)
            A2 = A * _LOG2E
            gx, gdt = torch.empty_like(u), torch.empty_like(u)
            gB, gC = torch.empty_like(B), torch.empty_like(C)
            gA = torch.zeros_like(A)
            # dL/d(state before the block just processed): it flows into the last state of the block before.
            carry = u.new_zeros(batch, d_inner, d_state)
            a_buf = u.new_empty(min(block, T), batch, d_inner, d_state)
            h_buf, g_buf = torch.empty_like(a_buf), torch.empty_like(a_buf)
            starts = u.new_empty(math.ceil(min(chunk, T) / block), batch, d_inner, d_state)
            ones = u.new_ones(1, a_buf.size(0) * batch)
            for k in reversed(range(saved.size(0))):
                spans = _spans(k * chunk, min(k * chunk + chunk, T), block)
                starts[0].copy_(saved[k])
                for j, (s, e) in enumerate(spans[:-1]):
                    _, h = _block_states(a_buf, h_buf, dt, x, B, A2, starts[j], s, e)
                    starts[j + 1].copy_(h[-1])
                for j in reversed(range(len(spans))):
                    s, e = spans[j]
                    steps, m = e - s, (e - s) * batch
                    h0 = starts[j]
                    a, h = _block_states(a_buf, h_buf, dt, x, B, A2, h0, s, e)
                    torch.bmm(gy[s:e].view(m, 1, -1), h.view(m, d_inner, d_state), out=gC[s:e].view(m, 1, -1))
                    g = torch.mul(gy[s:e].unsqueeze(-1), C[s:e].unsqueeze(-2), out=g_buf[:steps])
                    g[-1].add_(carry)
                    for t in range(steps - 2, -1, -1):
                        g[t].addcmul_(a[t + 1], g[t + 1])
                    # g is now dL/dh_t; dL/d(dt u)_t = g_t . B_t and dL/dB_t = sum_d (dt u)_t g_t.
                    torch.bmm(B[s:e].view(m, 1, -1), g.view(m, d_inner, d_state).transpose(1, 2),
                              out=gx[s:e].view(m, 1, -1))
                    torch.bmm(x[s:e].view(m, 1, -1), g.view(m, d_inner, d_state), out=gB[s:e].view(m, 1, -1))
                    q = a.mul_(g)
                    carry.copy_(q[0])
                    # q_t = g_t a_t h_{t-1} = dL/d(dt_t A), the log-decay's gradient.
                    q[1:].mul_(h[:-1])
                    q[0].mul_(h0)
                    # dL/d(dt)_t through the decay is sum_n q_t A: one (1, d_state) @ (d_state, m) product per channel.
                    gdt[s:e].copy_(torch.bmm(A.unsqueeze(1), q.view(m, d_inner, d_state).permute(1, 2, 0))
                                   .view(d_inner, steps, batch).permute(1, 2, 0))
                    # dL/dA = sum over steps and sequences of q_t dt_t.
                    q.mul_(dt[s:e].unsqueeze(-1))
                    gA.view(1, -1).addmm_(ones[:, :m], q.view(m, -1))
            gdt.addcmul_(gx, u)
            gu = torch.addcmul(gy * D, gx, dt)
            gD = (gy * u).sum((0, 1))
        return (gu.transpose(0, 1), gdt.transpose(0, 1), gA, gB.transpose(0, 1), gC.transpose(0, 1), gD, None, None)


def selective_scan_reference(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                             D: torch.Tensor) -> torch.Tensor:
    """The sequential selective scan: the reference the other implementations are tested against.

    A Python loop over time that materialises (batch, time, d_inner, d_state) decays and drives and keeps every
    step's state for backward, so its memory grows with batch x time x d_inner x d_state. Same recurrence and
    contract as `selective_scan`.

    Args:
        u, dt, A, B, C, D: as in `selective_scan`.

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


class SelectiveScan(nn.Module):
    """`selective_scan` as a module without parameters or buffers, so instruments can see it as one step.

    `checked_as_unit` marks a module whose ops are one computation's internals (here a recurrence over every
    frame: thousands of small ops per call): an instrument that inspects every op, such as the non-finite
    tracer's replay, may check only the unit's inputs and outputs (and, in backward, the gradients its autograd
    nodes return) and look inside only when those are the first non-finite values.

    Args:
        impl (str): as in `selective_scan`.
    """

    checked_as_unit: ClassVar[bool] = True

    def __init__(self, impl: str = "auto") -> None:
        super().__init__()
        self.impl = impl

    def forward(self, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor) -> torch.Tensor:
        """Shapes as in `selective_scan`: u, dt (batch, time, d_inner), A (d_inner, d_state), B, C (batch, time,
        d_state), D (d_inner,) -> (batch, time, d_inner) float32."""
        return selective_scan(u, dt, A, B, C, D, impl=self.impl)


class SelectiveSSM(nn.Module):
    """Mamba block on width d: gated, causal-conv, input-dependent (selective) diagonal SSM.

    in_proj (d -> 2 d_inner, no bias) splits into x and gate z; x -> depthwise causal Conv1d(d_conv) -> SiLU;
    x_proj (d_inner -> dt_rank + 2 d_state, no bias) gives dt, B, C; dt_proj (dt_rank -> d_inner) -> softplus;
    A = -exp(A_log); y = scan(...) (a `SelectiveScan`) * SiLU(z); out_proj (d_inner -> d, no bias).

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
        self.scan = SelectiveScan()
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
        y = self.scan(u, dt, self.A, B, C, self.D)
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

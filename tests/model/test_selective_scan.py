"""The scalable selective scans against the sequential reference: forward, every gradient, padding, dispatch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workbench.model import SelectiveSSM
from workbench.model.ssm import (
    auto_scan_impl,
    mamba_scan_available,
    selective_scan,
    selective_scan_chunked,
    selective_scan_mamba,
    selective_scan_reference,
)

NAMES = ("y", "u", "dt", "A", "B", "C", "D")


def scan_inputs(lengths: list[int], frames: int, d_inner: int, d_state: int, seed: int = 0, dt_scale: float = 1.0,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """u, dt, A, B, C, D (leaves requiring grad) for a right-padded batch: dt = 0 beyond each length.

    u, B and C hold random values in the padding too, so a scan that let padded frames in would show it.
    """
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    valid = (torch.arange(frames) < torch.tensor(lengths)[:, None]).unsqueeze(-1)
    u = torch.randn(b, frames, d_inner, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, frames, d_inner, generator=g, dtype=dtype) * dt_scale - 1) * valid
    A = -torch.exp(torch.randn(d_inner, d_state, generator=g, dtype=dtype))
    B = torch.randn(b, frames, d_state, generator=g, dtype=dtype)
    C = torch.randn(b, frames, d_state, generator=g, dtype=dtype)
    D = torch.randn(d_inner, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, dt, A, B, C, D)]


def output_grad(lengths: list[int], frames: int, d_inner: int, seed: int = 1) -> torch.Tensor:
    """(batch, frames, d_inner) random upstream gradient, zero beyond each length: padded outputs are ignored."""
    g = torch.Generator().manual_seed(seed)
    valid = (torch.arange(frames) < torch.tensor(lengths)[:, None]).unsqueeze(-1)
    return torch.randn(len(lengths), frames, d_inner, generator=g) * valid


def forward_and_grads(scan, inputs: list[torch.Tensor], grad_y: torch.Tensor) -> list[torch.Tensor]:
    y = scan(*inputs)
    return [y.detach(), *torch.autograd.grad(y, inputs, grad_y)]


def assert_rel_close(actual: list[torch.Tensor], expected: list[torch.Tensor], valid: torch.Tensor,
                     tol: float = 1e-4) -> None:
    """max |actual - expected| <= tol * max |expected| for y (on valid frames) and each gradient."""
    for name, a, e in zip(NAMES, actual, expected):
        if name == "y":
            a, e = a[valid], e[valid]
        err, scale = (a - e).abs().max().item(), e.abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} x max |reference| {scale:.3g}"


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """Names of every autograd node behind `tensor`."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize(("frames", "lengths", "chunk", "block"), [
    (1, [1, 1], 64, None),
    (7, [7, 4, 1], 3, 2),  # chunks 3+3+1, blocks 2+1
    (128, [128, 77, 5], 13, 4),  # 13 does not divide 128; blocks 4+4+4+1 inside each chunk
    (1000, [1000, 613, 1], 64, None),  # the defaults: one block per chunk at these widths
    (1000, [999, 1000, 380], 48, 7),
])
def test_chunked_matches_reference_in_forward_and_every_gradient(frames, lengths, chunk, block):
    inputs = scan_inputs(lengths, frames, d_inner=4, d_state=3)
    grad_y = output_grad(lengths, frames, 4)
    valid = torch.arange(frames) < torch.tensor(lengths)[:, None]
    expected = forward_and_grads(selective_scan_reference, inputs, grad_y)
    actual = forward_and_grads(lambda *x: selective_scan_chunked(*x, chunk=chunk, block=block), inputs, grad_y)
    assert_rel_close(actual, expected, valid)


def test_chunked_matches_reference_with_underflowing_decays():
    # dt up to ~50 and A down to ~-20: many decays are exactly 0 in float32, the regime where exp(cumsum)
    # closed forms divide 0 by 0.
    lengths = [300, 211]
    inputs = scan_inputs(lengths, 300, d_inner=6, d_state=5, seed=2, dt_scale=20.0)
    assert (torch.exp(inputs[1].detach().unsqueeze(-1) * inputs[2].detach()) == 0).any()
    grad_y = output_grad(lengths, 300, 6)
    valid = torch.arange(300) < torch.tensor(lengths)[:, None]
    actual = forward_and_grads(lambda *x: selective_scan_chunked(*x, chunk=32, block=5), inputs, grad_y)
    assert all(torch.isfinite(t).all() for t in actual)
    assert_rel_close(actual, forward_and_grads(selective_scan_reference, inputs, grad_y), valid)


def test_zero_step_frames_leave_the_state_unchanged():
    # Five dt = 0 frames across a block and a chunk boundary must act as if they were deleted.
    u, dt, A, B, C, D = (t.detach() for t in scan_inputs([20], 20, d_inner=3, d_state=4, seed=3))
    dt[:, 6:11] = 0.0
    keep = torch.cat([torch.arange(6), torch.arange(11, 20)])
    full = selective_scan_chunked(u, dt, A, B, C, D, chunk=8, block=3)
    deleted = selective_scan_chunked(u[:, keep], dt[:, keep], A, B[:, keep], C[:, keep], D, chunk=8, block=3)
    torch.testing.assert_close(full[:, keep], deleted, rtol=1e-6, atol=1e-6)


def test_chunked_gradcheck_float64():
    inputs = [t.detach().requires_grad_() for t in scan_inputs([9, 6], 9, d_inner=3, d_state=2, seed=4,
                                                                dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *x: selective_scan_chunked(*x, chunk=4, block=3), inputs)


def test_chunked_saves_no_time_by_d_state_tensor():
    b, frames, d_inner, d_state, chunk = 2, 1000, 32, 64, 64
    inputs = scan_inputs([frames] * b, frames, d_inner, d_state)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan_chunked(*inputs, chunk=chunk)
    # Inputs as saved: u, dt, dt * u; B, C; A, D; plus one (b, d_inner, d_state) state per chunk.
    budget = 3 * b * frames * d_inner + 2 * b * frames * d_state + 2 * d_inner * d_state + d_inner
    budget += math.ceil(frames / chunk) * b * d_inner * d_state
    assert sum(saved) <= budget < b * frames * d_inner * d_state / 4


def test_auto_choice_on_cpu_is_the_chunked_scan():
    inputs = scan_inputs([12, 5], 12, d_inner=4, d_state=3)
    assert auto_scan_impl(inputs[0], inputs[2]) == "chunked"
    assert "_ChunkedScanBackward" in graph_nodes(selective_scan(*inputs))
    assert "_ChunkedScanBackward" not in graph_nodes(selective_scan(*inputs, impl="reference"))
    torch.manual_seed(0)
    ssm = SelectiveSSM(8, d_state=4, d_conv=2, expand=2, dt_rank=1)
    assert "_ChunkedScanBackward" in graph_nodes(ssm(torch.randn(2, 10, 8)))


def test_forced_implementations_are_checked():
    inputs = scan_inputs([4], 4, d_inner=2, d_state=2)
    with pytest.raises(ValueError, match="impl"):
        selective_scan(*inputs, impl="fused")
    if not mamba_scan_available():
        with pytest.raises(RuntimeError, match="mamba-ssm"):
            selective_scan(*inputs, impl="mamba")


def test_half_precision_inputs_run_in_float32():
    inputs = [t.detach() for t in scan_inputs([50], 50, d_inner=4, d_state=3, seed=5)]
    y = selective_scan(*(t.bfloat16() for t in inputs))
    assert y.dtype == torch.float32
    reference = selective_scan_reference(*(t.bfloat16() for t in inputs))
    torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("frames", [7, 1000])
def test_chunked_on_cuda_matches_reference(frames):
    lengths = [frames, frames // 2 + 1]
    inputs = scan_inputs(lengths, frames, d_inner=16, d_state=8)
    grad_y = output_grad(lengths, frames, 16)
    valid = torch.arange(frames) < torch.tensor(lengths)[:, None]
    expected = forward_and_grads(selective_scan_reference, inputs, grad_y)
    on_gpu = [t.detach().cuda().requires_grad_() for t in inputs]
    actual = forward_and_grads(lambda *x: selective_scan(*x, impl="chunked"), on_gpu, grad_y.cuda())
    assert_rel_close([t.cpu() for t in actual], expected, valid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not mamba_scan_available(), reason="needs mamba-ssm's fused selective-scan kernel")
@pytest.mark.parametrize("frames", [1, 7, 128, 1000])
def test_mamba_kernel_matches_reference(frames):
    lengths = [frames, frames // 2 + 1, 1]
    inputs = scan_inputs(lengths, frames, d_inner=16, d_state=8)
    grad_y = output_grad(lengths, frames, 16)
    valid = torch.arange(frames) < torch.tensor(lengths)[:, None]
    expected = forward_and_grads(selective_scan_reference, inputs, grad_y)
    on_gpu = [t.detach().cuda().requires_grad_() for t in inputs]
    assert auto_scan_impl(on_gpu[0], on_gpu[2]) == "mamba"
    actual = forward_and_grads(selective_scan_mamba, on_gpu, grad_y.cuda())
    assert_rel_close([t.cpu() for t in actual], expected, valid)

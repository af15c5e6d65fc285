"""Loss functions: torchaudio RNN-T against a pure-torch reference, normalisation formulas, CTC, compute_losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from rnnt_reference import rnnt_nll
from workbench.model.losses import (
    RNNT_NORMALIZATIONS,
    LossWeights,
    compute_losses,
    ctc_loss,
    mode_loss,
    rnnt_loss,
)


def random_batch(seed: int, frames: list[int], labels: list[int], n_classes: int, *, pad_t: int = 0,
                 pad_u: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint logits (B, T, U+1, V) with random values everywhere (padding included), zero-padded targets."""
    g = torch.Generator().manual_seed(seed)
    max_t, max_u = max(frames) + pad_t, max(labels) + pad_u
    logits = torch.randn(len(frames), max_t, max_u + 1, n_classes, generator=g) * 2
    targets = torch.zeros(len(frames), max_u, dtype=torch.long)
    for b, u in enumerate(labels):
        targets[b, :u] = torch.randint(1, n_classes, (u,), generator=g)
    return logits, torch.tensor(frames), targets, torch.tensor(labels)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach().clamp(min=1e-12))


CASES = [
    ([1], [1], 3),
    ([4], [2], 5),
    ([7, 5, 3], [3, 4, 1], 6),
    ([12, 9], [5, 2], 41),
]


@pytest.mark.parametrize("frames,labels,n_classes", CASES)
def test_torchaudio_matches_reference_loss_and_gradients(frames, labels, n_classes):
    logits, logit_lengths, targets, target_lengths = random_batch(0, frames, labels, n_classes)
    ours = logits.clone().requires_grad_(True)
    nll = AF.rnnt_loss(ours, targets.int(), logit_lengths.int(), target_lengths.int(), blank=0, reduction="none")
    nll.sum().backward()
    for b, (t, u) in enumerate(zip(frames, labels)):
        ref_logits = logits[b, :t, :u + 1].double().requires_grad_(True)
        ref = rnnt_nll(ref_logits, targets[b, :u])
        ref.backward()
        assert relative_error(nll[b].double(), ref.detach()) < 1e-4
        assert relative_error(ours.grad[b, :t, :u + 1].double(), ref_logits.grad) < 1e-4
        # Lattice cells outside the utterance get no gradient.
        assert float(ours.grad[b, t:].abs().sum() + ours.grad[b, :, u + 1:].abs().sum()) == 0.0


def test_single_frame_single_label_closed_form():
    # T=1, U=1: the only path emits y1 at (0, 0) then blank at (0, 1).
    logits = torch.randn(1, 1, 2, 4)
    lp = torch.log_softmax(logits, -1)
    expected = -(lp[0, 0, 0, 3] + lp[0, 0, 1, 0])
    got = rnnt_loss(logits, torch.tensor([1]), torch.tensor([[3]]), torch.tensor([1]), normalization="sum")
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("normalization", RNNT_NORMALIZATIONS)
def test_normalisation_formulas(normalization):
    frames, labels = [9, 6, 4], [4, 2, 3]
    logits, logit_lengths, targets, target_lengths = random_batch(1, frames, labels, 7)
    nll = torch.stack([rnnt_nll(logits[b, :t, :u + 1].double(), targets[b, :u])
                       for b, (t, u) in enumerate(zip(frames, labels))])
    mean_t, mean_u = sum(frames) / 3, sum(labels) / 3
    expected = {
        "torchaudio_mean": nll.mean(),
        "seed_sqrt_tu": nll.mean() / max(math.sqrt(mean_t * mean_u), 5.0),
        "per_frame": nll.sum() / sum(frames),
        "per_token": nll.sum() / sum(labels),
        "sum": nll.sum(),
    }[normalization]
    got = rnnt_loss(logits, logit_lengths, targets, target_lengths, normalization=normalization)
    assert got.dtype == torch.float32
    assert relative_error(got.double(), expected) < 1e-4


def test_seed_scale_uses_sqrt_when_above_five():
    frames, labels = [40, 30], [10, 6]
    logits, logit_lengths, targets, target_lengths = random_batch(2, frames, labels, 5)
    mean = rnnt_loss(logits, logit_lengths, targets, target_lengths, normalization="torchaudio_mean")
    seed = rnnt_loss(logits, logit_lengths, targets, target_lengths, normalization="seed_sqrt_tu")
    assert torch.allclose(seed, mean / math.sqrt(35 * 8), rtol=1e-5)


def test_unknown_normalisation_lists_valid_ones():
    logits, logit_lengths, targets, target_lengths = random_batch(0, [3], [1], 4)
    with pytest.raises(ValueError, match="torchaudio_mean, seed_sqrt_tu, per_frame, per_token, sum"):
        rnnt_loss(logits, logit_lengths, targets, target_lengths, normalization="mean")


def test_rnnt_loss_positive_and_padding_invariant():
    frames, labels = [8, 5], [3, 1]
    logits, logit_lengths, targets, target_lengths = random_batch(3, frames, labels, 6)
    base = rnnt_loss(logits, logit_lengths, targets, target_lengths, normalization="torchaudio_mean")
    assert float(base) > 0
    padded, _, padded_targets, _ = random_batch(3, frames, labels, 6, pad_t=4, pad_u=3)
    padded[:, :8, :4] = logits
    padded_targets[:, :3] = targets
    again = rnnt_loss(padded, logit_lengths, padded_targets, target_lengths, normalization="torchaudio_mean")
    assert torch.allclose(base, again, rtol=1e-6)


def test_rnnt_loss_half_precision_logits_are_upcast():
    logits, logit_lengths, targets, target_lengths = random_batch(4, [6, 4], [2, 3], 5)
    full = rnnt_loss(logits, logit_lengths, targets, target_lengths, normalization="sum")
    half = rnnt_loss(logits.half(), logit_lengths, targets, target_lengths, normalization="sum")
    assert half.dtype == torch.float32
    assert torch.allclose(full, half, rtol=1e-2)


def test_rnnt_errors_propagate():
    logits, logit_lengths, targets, target_lengths = random_batch(0, [5], [2], 4)
    with pytest.raises(RuntimeError):
        rnnt_loss(logits, torch.tensor([7]), targets, target_lengths)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        rnnt_loss(logits, logit_lengths, torch.tensor([[1, 4]]), target_lengths)


def test_ctc_loss_matches_direct_computation_and_ignores_padding():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 12, 6, generator=g)
    lengths = torch.tensor([12, 9, 7])
    targets = torch.tensor([[1, 2, 2, 3], [4, 5, 0, 0], [1, 0, 0, 0]])
    target_lengths = torch.tensor([4, 2, 1])
    nll = F.ctc_loss(torch.log_softmax(logits, -1).transpose(0, 1), targets, lengths, target_lengths,
                     reduction="none")
    got = ctc_loss(logits, lengths, targets, target_lengths)
    assert float(got) > 0
    assert torch.allclose(got, (nll / target_lengths).mean(), rtol=1e-6)
    padded_targets = torch.cat([targets, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    assert torch.allclose(got, ctc_loss(logits, lengths, padded_targets, target_lengths), rtol=1e-6)
    assert torch.allclose(got, ctc_loss(logits.bfloat16(), lengths, targets, target_lengths), rtol=5e-2)


def test_ctc_infeasible_utterance_is_zeroed():
    logits = torch.randn(1, 2, 5, requires_grad=True)
    loss = ctc_loss(logits, torch.tensor([2]), torch.tensor([[1, 1, 1]]), torch.tensor([3]))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum().item() == 0.0


def test_mode_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    assert torch.allclose(mode_loss(logits, labels), F.cross_entropy(logits, labels))


def model_like_outputs(with_mode: bool) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    lengths, target_lengths = torch.tensor([10, 7]), torch.tensor([3, 2])
    targets = torch.tensor([[1, 2, 3], [4, 5, 0]])
    outputs = {
        "ctc_logits": torch.randn(2, 10, 6, generator=g).requires_grad_(True),
        "rnnt_logits": torch.randn(2, 10, 4, 6, generator=g).requires_grad_(True),
        "mode_logits": torch.randn(2, 2, generator=g).requires_grad_(True) if with_mode else None,
    }
    return outputs, lengths, targets, target_lengths


def test_compute_losses_weighted_total_and_zero_weight_terms():
    outputs, lengths, targets, target_lengths = model_like_outputs(with_mode=True)
    labels = torch.tensor([0, 1])
    weights = LossWeights(ctc=0.3, rnnt=1.0, mode=0.0)
    losses = compute_losses(outputs, lengths, targets, target_lengths, labels, weights, "per_token")
    assert set(losses) == {"ctc", "rnnt", "mode", "total"}
    assert not losses["mode"].requires_grad
    assert torch.allclose(losses["total"], 0.3 * losses["ctc"] + losses["rnnt"])
    losses["total"].backward()
    assert outputs["mode_logits"].grad is None
    assert outputs["rnnt_logits"].grad is not None
    expected_rnnt = rnnt_loss(outputs["rnnt_logits"], lengths, targets, target_lengths, normalization="per_token")
    assert torch.allclose(losses["rnnt"], expected_rnnt)


def test_compute_losses_only_for_present_inputs():
    outputs, lengths, targets, target_lengths = model_like_outputs(with_mode=True)
    outputs["rnnt_logits"] = None
    losses = compute_losses(outputs, lengths, targets, target_lengths, None, LossWeights(1.0, 1.0, 1.0), "sum")
    assert set(losses) == {"ctc", "total"}
    assert torch.allclose(losses["total"], losses["ctc"])
    nothing = compute_losses(outputs, lengths, targets, target_lengths, None, LossWeights(0.0, 1.0, 1.0), "sum")
    assert float(nothing["total"]) == 0.0 and not nothing["total"].requires_grad

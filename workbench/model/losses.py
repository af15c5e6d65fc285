r"""Loss terms of the hybrid (modessm.md section 2): CTC, RNN-T with explicit normalisation policies, mode CE.

Notation: utterance b has :math:`T_b` valid frames and :math:`U_b` target labels :math:`y_1 .. y_{U_b}`; V is the
vocabulary size including blank :math:`\varnothing`.

**RNN-T.** The joint network gives logits :math:`z_{t,u,k}` for frame :math:`t` and label context
:math:`u` (:math:`u` labels emitted so far); :math:`\log p(k \mid t, u) = \mathrm{log\_softmax}_k(z_{t,u})`.
An alignment is a monotone path through the :math:`T_b \times (U_b + 1)` lattice where a blank moves
:math:`t \to t+1` and label :math:`y_{u+1}` moves :math:`u \to u+1`. With the forward variable

.. math::
    \alpha(0, 0) = 0, \qquad
    \alpha(t, u) = \operatorname{logaddexp}\big(\alpha(t-1, u) + \log p(\varnothing \mid t-1, u),\;
                                               \alpha(t, u-1) + \log p(y_u \mid t, u-1)\big)

the per-utterance loss is :math:`\mathcal{L}_b = -\log P(y \mid x) = -\big(\alpha(T_b-1, U_b) +
\log p(\varnothing \mid T_b-1, U_b)\big)`. torchaudio computes it (and its gradient) with
``fused_log_softmax=True``, i.e. from raw logits.

**CTC.** :math:`\mathcal{L}_b = -\log \sum_{\pi \in \mathcal{B}^{-1}(y)} \prod_t p(\pi_t \mid t)` over the
frame-level paths that collapse to :math:`y`.

**Mode.** Cross-entropy of the utterance-level mode logits.

No function here catches exceptions: a failing loss raises (the seed turned any RNN-T exception, OOM included,
into a silent constant zero loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
import torchaudio.functional as AF

RNNT_NORMALIZATIONS: tuple[str, ...] = ("torchaudio_mean", "seed_sqrt_tu", "per_frame", "per_token", "sum")


def _check_targets(targets: torch.Tensor, target_lengths: torch.Tensor, n_classes: int) -> None:
    """Raise if a label within its length is outside [0, V): neither CUDA CTC nor torchaudio RNN-T range-check
    labels, they read out of bounds (modessm.md 7.G). Blank inside a target is allowed on purpose, so that the
    seed's padded-label defect (7.H) can be reproduced."""
    valid = torch.arange(targets.size(1), device=targets.device) < target_lengths.to(targets.device)[:, None]
    bad = valid & ((targets < 0) | (targets >= n_classes))
    if bool(bad.any()):
        raise ValueError(f"target labels must lie in [0, {n_classes}); got {targets[bad].unique().tolist()}")


def ctc_loss(
    logits: torch.Tensor,
    logit_lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    blank: int = 0,
    zero_infinity: bool = True,
) -> torch.Tensor:
    r"""CTC loss as the seed computes it: :math:`\frac{1}{B} \sum_b \mathcal{L}_b / \max(U_b, 1)`.

    log_softmax runs in float32 whatever the logits' dtype. With `zero_infinity` an infeasible utterance
    (fewer frames than the target needs) contributes 0 loss and 0 gradient instead of inf.

    Args:
        logits (Tensor): (B, T, V) unnormalised CTC logits.
        logit_lengths (Tensor): (B,) valid frames.
        targets (Tensor): (B, S) labels, padded beyond `target_lengths`.
        target_lengths (Tensor): (B,) labels per utterance.
        blank (int): blank index.
        zero_infinity (bool): replace infinite losses (and their gradients) by zero.

    Returns:
        Tensor: scalar float32 loss.
    """
    _check_targets(targets, target_lengths, logits.size(-1))
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
    return F.ctc_loss(log_probs, targets, logit_lengths, target_lengths, blank=blank, reduction="mean",
                      zero_infinity=zero_infinity)


def rnnt_loss(
    logits: torch.Tensor,
    logit_lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    blank: int = 0,
    normalization: str = "seed_sqrt_tu",
) -> torch.Tensor:
    r"""RNN-T loss (torchaudio, float32) reduced with an explicit normalisation policy.

    With per-utterance NLL :math:`\mathcal{L}_b`, frames :math:`T_b` = `logit_lengths` and labels
    :math:`U_b` = `target_lengths`:

    - ``torchaudio_mean``: :math:`\frac{1}{B}\sum_b \mathcal{L}_b` (torchaudio's ``reduction='mean'``).
    - ``seed_sqrt_tu``: :math:`\frac{1}{B}\sum_b \mathcal{L}_b \,/\, \max(\sqrt{\bar{T}\,\bar{U}}, 5)` with
      batch means :math:`\bar{T}, \bar{U}`: the seed's exact formula (a constant divisor, no gradient).
    - ``per_frame``: :math:`\sum_b \mathcal{L}_b / \max(\sum_b T_b, 1)`.
    - ``per_token``: :math:`\sum_b \mathcal{L}_b / \max(\sum_b U_b, 1)`.
    - ``sum``: :math:`\sum_b \mathcal{L}_b`.

    The lattice is trimmed to max(T_b) x (max(U_b) + 1) first (torchaudio requires exactly that size, and
    contiguous inputs), so extra padding on the logits or the targets does not change the result.

    Args:
        logits (Tensor): (B, T, U + 1, V) joint logits (any float dtype).
        logit_lengths (Tensor): (B,) valid frames.
        targets (Tensor): (B, U) labels, padded.
        target_lengths (Tensor): (B,) labels per utterance.
        blank (int): blank index.
        normalization (str): one of RNNT_NORMALIZATIONS.

    Returns:
        Tensor: scalar float32 loss.
    """
    if normalization not in RNNT_NORMALIZATIONS:
        raise ValueError(f"rnnt normalization: expected one of {', '.join(RNNT_NORMALIZATIONS)}, "
                         f"got {normalization!r}")
    _check_targets(targets, target_lengths, logits.size(-1))
    max_t, max_u = int(logit_lengths.max()), int(target_lengths.max())
    nll = AF.rnnt_loss(
        logits[:, :max_t, :max_u + 1].float().contiguous(),
        targets[:, :max_u].int().contiguous(),
        logit_lengths.int(),
        target_lengths.int(),
        blank=blank,
        reduction="none",
    )
    frames, labels = logit_lengths.float(), target_lengths.float()
    if normalization == "torchaudio_mean":
        return nll.mean()
    if normalization == "seed_sqrt_tu":
        return nll.mean() / torch.sqrt(frames.mean() * labels.mean()).clamp(min=5.0)
    if normalization == "per_frame":
        return nll.sum() / frames.sum().clamp(min=1.0)
    if normalization == "per_token":
        return nll.sum() / labels.sum().clamp(min=1.0)
    return nll.sum()


def mode_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the mode logits in float32.

    Args:
        logits (Tensor): (B, n_modes). labels (Tensor): (B,) int64 mode ids.

    Returns:
        Tensor: scalar mean cross-entropy.
    """
    return F.cross_entropy(logits.float(), labels)


@dataclass
class LossWeights:
    """Weights of the loss terms in `total` (the seed's stages: warmup 1/0/0, joint 0.3/1/0, mode 0.3/1/0.1)."""

    ctc: float
    rnnt: float
    mode: float


def compute_losses(
    outputs: Mapping[str, torch.Tensor | None],
    feature_lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    mode_labels: torch.Tensor | None,
    weights: LossWeights,
    rnnt_normalization: str = "seed_sqrt_tu",
) -> dict[str, torch.Tensor]:
    """Every loss term whose inputs exist, plus their weighted sum.

    A term is computed when its logits are in `outputs` (``ctc_logits``, ``rnnt_logits``; ``mode_logits`` also
    needs `mode_labels`). A term with weight 0 is still computed and reported, detached, so attribution can see
    it, but it is left out of ``total`` (0 * NaN would otherwise poison the sum). With no weighted term
    ``total`` is a zero that requires no gradient.

    Args:
        outputs (dict): HybridModel.forward's output.
        feature_lengths (Tensor): (B,) valid frames (= logit lengths: the model does not downsample).
        targets (Tensor): (B, U) labels. target_lengths (Tensor): (B,).
        mode_labels (Tensor or None): (B,) mode ids.
        weights (LossWeights): term weights.
        rnnt_normalization (str): see `rnnt_loss`.

    Returns:
        dict[str, Tensor]: scalar float32 tensors: the computed terms among ``ctc``, ``rnnt``, ``mode``, and
        ``total``.
    """
    terms: dict[str, torch.Tensor] = {}
    if outputs.get("ctc_logits") is not None:
        terms["ctc"] = ctc_loss(outputs["ctc_logits"], feature_lengths, targets, target_lengths)
    if outputs.get("rnnt_logits") is not None:
        terms["rnnt"] = rnnt_loss(outputs["rnnt_logits"], feature_lengths, targets, target_lengths,
                                  normalization=rnnt_normalization)
    if outputs.get("mode_logits") is not None and mode_labels is not None:
        terms["mode"] = mode_loss(outputs["mode_logits"], mode_labels)
    total = torch.zeros((), device=feature_lengths.device)
    losses: dict[str, torch.Tensor] = {}
    for name, value in terms.items():
        weight = getattr(weights, name)
        if weight == 0:
            losses[name] = value.detach()
        else:
            losses[name] = value
            total = total + weight * value
    losses["total"] = total
    return losses

"""Validation: CTC greedy PER (the baseline's aggregate PER) and, once the decoder has trained, RNN-T greedy PER."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from workbench.model.metrics import ctc_greedy_decode, error_rate


@dataclass
class EvalResult:
    per: float
    rnnt_per: float | None
    n_trials: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *, rnnt: bool = False) -> EvalResult:
    """Aggregate PER = sum of edit distances / sum of reference lengths, in fp32 and eval mode."""
    was_training = model.training
    model.eval()
    refs, hyps, rnnt_hyps = [], [], []
    for batch in loader:
        batch = batch.to(device)
        out = model(batch.features, batch.feature_lengths, rnnt=False)
        hyps += ctc_greedy_decode(out["ctc_logits"], out["lengths"])
        refs += [t[:n].tolist() for t, n in zip(batch.targets.cpu(), batch.target_lengths.cpu())]
        if rnnt:
            rnnt_hyps += model.rnnt_decoder.greedy_decode(out["encoded"], out["lengths"])
    model.train(was_training)
    return EvalResult(error_rate(refs, hyps), error_rate(refs, rnnt_hyps) if rnnt else None, len(refs))

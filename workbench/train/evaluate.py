"""Validation: CTC greedy PER (the baseline's aggregate PER) and, once the decoder has trained, RNN-T greedy PER,
each with its substitution / deletion / insertion split, length ratio and per-utterance errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from workbench.data import Trial, make_loader
from workbench.model.metrics import Score, ctc_greedy_decode, score

# Validation batches hold this many training batches: a forward under no_grad keeps no activations for a backward,
# so it fits where the training step fits, and greedy RNN-T decoding loops over frames in Python once per batch
# (at `tiny`, 80 validation trials in batches of 4 made decoding about a third of a joint run's time).
EVAL_BATCH_FACTOR = 4


def validation_loader(dataset: Dataset[Trial], batch_size: int, seed: int) -> DataLoader:
    """The validation split in a fixed order, in batches of `EVAL_BATCH_FACTOR` x the training `batch_size`."""
    return make_loader(dataset, EVAL_BATCH_FACTOR * batch_size, shuffle=False, seed=seed)


@dataclass
class EvalResult:
    """`ctc` and `rnnt` (None when not decoded) score the same utterances in loader order."""

    ctc: Score
    rnnt: Score | None

    @property
    def per(self) -> float:
        return self.ctc.per

    @property
    def rnnt_per(self) -> float | None:
        return None if self.rnnt is None else self.rnnt.per

    @property
    def n_trials(self) -> int:
        return len(self.ctc.errors)

    def attrs(self, prefix: str = "") -> dict[str, Any]:
        """The flat facts a run stores: `per`, `rnnt_per`, and for the RNN-T decoder `rnnt_length_ratio`,
        `rnnt_functional`, `rnnt_sdi` ([S, D, I]); per utterance `ctc_errors`, `rnnt_errors` and `ref_lengths`
        (for paired comparisons); each name with `prefix` (e.g. "val_")."""
        out: dict[str, Any] = {"per": self.per, "rnnt_per": self.rnnt_per, "ctc_errors": list(self.ctc.errors),
                               "ref_lengths": list(self.ctc.ref_lengths)}
        if self.rnnt is not None:
            d = self.rnnt.to_dict()
            out.update(rnnt_length_ratio=d["length_ratio"], rnnt_functional=d["functional"], rnnt_sdi=d["sdi"],
                       rnnt_errors=d["errors"])
        return {prefix + k: v for k, v in out.items()}


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
    return EvalResult(score(refs, hyps), score(refs, rnnt_hyps) if rnnt else None)

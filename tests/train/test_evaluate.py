"""Validation scores do not depend on how the split is batched (it is batched larger than training)."""

from pathlib import Path

import torch

from workbench.data import B2TDataset, make_loader
from workbench.model import HybridModel, get_config
from workbench.train.evaluate import EVAL_BATCH_FACTOR, evaluate, validation_loader

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"


def test_per_utterance_errors_do_not_depend_on_the_batching():
    torch.manual_seed(0)
    model = HybridModel(get_config("tiny"))
    val = B2TDataset(SAMPLE, "val")
    cpu = torch.device("cpu")
    small = evaluate(model, make_loader(val, 4, shuffle=False, seed=0), cpu, rnnt=True)
    loader = validation_loader(val, 4, seed=0)
    assert loader.batch_size == 4 * EVAL_BATCH_FACTOR
    large = evaluate(model, loader, cpu, rnnt=True)
    assert small.ctc.errors == large.ctc.errors and small.rnnt.errors == large.rnnt.errors
    assert small.ctc.counts == large.ctc.counts and small.rnnt.counts == large.rnnt.counts
    assert sum(small.rnnt.errors) > 0 and small.rnnt.counts.hyp_tokens > 0  # a decoder that emits, so it can differ

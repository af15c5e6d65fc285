"""`workbench.byo` on models the package does not define: a GRU classifier and an MLP with a hand-written
softmax, each with its own loss function."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.cli import main
from workbench.run.byo import GradNormProbe, UserBatch, instrument, loss_terms
from workbench.records import RunLog, read_record, summarize

GROUPS = {"recurrent": "encoder", "output": "re:^head\\.weight$", "biases": "re:bias"}


class GRUClassifier(nn.Module):
    def __init__(self, n_in: int = 6, hidden: int = 12, n_classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.GRU(n_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, n_in) -> logits (B, n_classes) from the last frame."""
        out, _ = self.encoder(x)
        return self.head(out[:, -1])


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def ce_and_l2(model, batch):
    x, y = batch
    return {"ce": F.cross_entropy(model(x), y), "l2": 1e-3 * model.head.weight.square().sum()}


def gru_batch(seed: int, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def group_norms_by_hand(model, loss_fn, batch, groups):
    """Gradient norm per group from a plain backward on a copy of the model."""
    model = copy.deepcopy(model)
    loss = loss_fn(model, batch)
    loss = loss if isinstance(loss, torch.Tensor) else sum(loss.values())
    loss.backward()
    params = dict(model.named_parameters())
    return {g: math.sqrt(sum(float(params[n].grad.double().square().sum()) for n in names))
            for g, names in groups.items()}


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_one_step_records_user_groups_that_match_an_independent_computation():
    torch.manual_seed(0)
    model = GRUClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = gru_batch(1)
    before = copy.deepcopy(model)
    with instrument(model, optimizer, ce_loss, groups=GROUPS) as session:
        result = session.step(batch)
        expected = group_norms_by_hand(before, ce_loss, batch, session.probe.groups)
        stats = session.probe.latest
    assert result.step == 1 and not result.skipped and set(result.losses) == {"total"}
    with torch.no_grad():
        assert result.losses["total"] == pytest.approx(float(ce_loss(before, batch)), rel=1e-6)
    assert list(stats.group_norm) == ["recurrent", "output", "biases"]
    assert session.probe.groups["output"] == ["head.weight"]
    assert session.probe.groups["biases"] == ["encoder.bias_ih_l0", "encoder.bias_hh_l0", "head.bias"]
    for group, value in expected.items():
        assert stats.group_norm[group] == pytest.approx(value, rel=1e-5), group
    assert stats.group_nonfinite == {"recurrent": 0, "output": 0, "biases": 0}
    assert session.verdicts == [] and session.coverage.findings == []
    # the optimizer stepped: the model moved away from its copy
    assert not torch.equal(model.head.weight, before.head.weight)


def test_default_and_prefix_groups():
    model = GRUClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with instrument(model, optimizer, ce_loss, trace=False) as session:
        session.step(gru_batch(0))
        assert list(session.probe.latest.group_norm) == ["encoder", "head"]
    with instrument(model, optimizer, ce_loss, groups=["encoder", "re:weight"], trace=False) as session:
        session.step(gru_batch(0))
        # head.bias is in neither pattern: it still belongs to a group, so its updates are checked
        assert list(session.probe.latest.group_norm) == ["encoder", "re:weight", "(other)"]
        assert session.probe.groups["(other)"] == ["head.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        instrument(model, optimizer, ce_loss, groups=["decoder"])


def test_multi_step_series_in_the_run_log(tmp_path):
    torch.manual_seed(0)
    model = GRUClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    log_path = tmp_path / "logs" / "gru.h5"  # the folder does not exist yet
    with instrument(model, optimizer, ce_and_l2, groups=GROUPS, log_path=log_path, activations=True) as session:
        results = [session.step(gru_batch(seed)) for seed in range(4)]
    for r in results:
        assert r.losses["total"] == pytest.approx(r.losses["ce"] + r.losses["l2"], rel=1e-6)
    with RunLog(log_path) as log:
        assert log.status == "finished"
        for term in ("total", "ce", "l2"):
            steps, values = log.series(f"loss/{term}")
            assert steps.tolist() == [1, 2, 3, 4]
            np.testing.assert_array_equal(values, [r.losses[term] for r in results])
        for group in GROUPS:
            _, norms = log.series(f"grad_norm/{group}")
            np.testing.assert_array_equal(norms, [s.group_norm[group] for s in session.probe.history])
            assert session.record.group_norms[group] == norms.tolist()
        _, per_param = log.series("param_grad_norm")
        assert per_param.shape == (4, 6) and log.labels("param_grad_norm")[0] == "encoder.weight_ih_l0"
        _, clip = log.series("clip/total_norm")
        np.testing.assert_array_equal(clip, [r.grad_norm for r in results])
        assert {"act_max/encoder", "act_rms/head", "act_nonfinite/head"} <= set(log.series_names())
        assert log.attrs["settings"]["groups"]["output"] == ["head.weight"]
    summary = summarize(read_record(log_path))
    assert summary == session.summary()  # the record read back from the log is the one the session kept
    assert summary["steps"] == 4 and summary["first_nonfinite_loss_step"] is None


def test_a_parameter_left_out_of_the_optimizer_is_flagged(tmp_path):
    model = GRUClassifier()
    optimizer = torch.optim.Adam(model.encoder.parameters(), lr=1e-3)  # the head was forgotten
    with instrument(model, optimizer, ce_loss, log_path=tmp_path / "forgot.h5", trace=False) as session:
        session.step(gru_batch(0))
        session.step(gru_batch(1))
    finding = session.coverage.latest
    outside = dict(finding.outside_optimizer)
    assert set(outside) == {"head.weight", "head.bias"}
    assert outside["head.weight"] == pytest.approx(session.probe.latest.param_norm[
        session.probe.latest.param_names.index("head.weight")])
    first = session.coverage.findings[0]
    assert session.summary()["outside_optimizer"] == [name for name, _ in first.outside_optimizer]
    with RunLog(tmp_path / "forgot.h5") as log:
        rows = log.table("coverage")
    assert [r["step"] for r in rows] == [1, 2]
    assert "2 trainable tensors outside the optimizer" in rows[0]["line"]


def test_close_removes_every_hook_and_observer():
    model = GRUClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert hooks(model) == 0
    session = instrument(model, optimizer, ce_loss, activations=True)
    assert hooks(model) == 2  # the GRU and the head
    session.step(gru_batch(0))
    assert set(session.activations.latest) == {"encoder", "head"}
    session.close()
    assert hooks(model) == 0 and session.train_step.observers == []
    session.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        session.step(gru_batch(0))
    model(gru_batch(0)[0]).sum().backward()  # the bare model still runs, unobserved
    assert session.activations.collect() == {}


def test_an_exception_inside_the_block_detaches_and_marks_the_log_failed(tmp_path):
    model = GRUClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError):
        with instrument(model, optimizer, ce_loss, activations=True, log_path=tmp_path / "bad.h5") as session:
            session.step((torch.randn(2, 7, 5), torch.zeros(2, dtype=torch.long)))  # wrong feature size
    assert hooks(model) == 0
    with RunLog(tmp_path / "bad.h5") as log:
        assert log.status == "failed" and "RuntimeError" in log.attrs["error"]


class NaiveSoftmax(nn.Module):
    """Class probabilities as exp(z) / sum exp(z), without subtracting the max: overflows for logits above ~88."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, k)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        e = torch.exp(self.proj(h))
        return e / e.sum(dim=-1, keepdim=True)


class MLP(nn.Module):
    def __init__(self, n_in: int = 4, hidden: int = 16, k: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU())
        self.head = NaiveSoftmax(hidden, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def nll_of_probs(model, batch):
    x, y = batch
    return F.nll_loss(torch.log(model(x)), y)


def test_tracer_names_the_op_where_the_users_model_overflows(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    raw = x * 1e4  # the same features in raw, un-normalised units
    with instrument(model, optimizer, nll_of_probs, log_path=tmp_path / "mlp.h5") as session:
        first = session.step((x, y))
        params_before = copy.deepcopy(model.state_dict())
        second = session.step((raw, y))
        unchanged = all(torch.equal(params_before[k], v) for k, v in model.state_dict().items())
        third = session.step((x, y))
    assert math.isfinite(first.losses["total"]) and not math.isfinite(second.losses["total"])
    assert second.skipped and second.reason == "nonfinite_grad" and unchanged  # corrected semantics: no update
    assert math.isfinite(third.losses["total"])
    [verdict] = session.verdicts
    assert (verdict.step, verdict.phase, verdict.role) == (2, "forward", "producer")
    assert verdict.module == "head" and verdict.op.startswith("aten.exp") and verdict.inf > 0
    assert verdict.input_absmax > 88.0  # exp overflows float32 above log(3.4e38) ~ 88.7
    summary = session.summary()
    assert summary["first_nonfinite_loss_step"] == 2 and summary["tracer_verdicts"] == [verdict.line()]
    assert summary["overflow_steps"] == [2] and summary["skipped_steps"] == [2]
    with RunLog(tmp_path / "mlp.h5") as log:
        [row] = log.table("tracer")
        assert row["line"] == verdict.line() and row["findings"][0]["module"] == "head" and row["skipped"]
        _, total = log.series("loss/total")
        assert np.isfinite(total).tolist() == [True, False, True]


class WarmStartMLP(MLP):
    """An MLP whose input gain is 1e4 until its first forward, then 1: state in a Python attribute, which no
    replay bundle holds, so a replay of that first step runs at gain 1."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = 1e4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x * self.gain)
        self.gain = 1.0
        return out


def test_a_step_the_tracer_cannot_reproduce_is_logged_and_printed_untraced(tmp_path, capsys):
    torch.manual_seed(0)
    model = WarmStartMLP()
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    with instrument(model, torch.optim.SGD(model.parameters(), lr=1e-2), nll_of_probs,
                    log_path=tmp_path / "warm.h5") as session:
        first = session.step(batch)
    assert not math.isfinite(first.losses["total"]) and session.verdicts == []
    with RunLog(tmp_path / "warm.h5") as log:
        [row] = log.table("tracer_unreproduced")
    assert row["step"] == 1 and "stayed finite" in row["why"]
    assert main(["trace", str(tmp_path / "warm.h5")]) == 0
    assert f"step 1: not traced: {row['why']}" in capsys.readouterr().out


def test_fp16_session_records_the_loss_scale(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    with instrument(model, optimizer, nll_of_probs, precision="fp16", init_scale=1024.0,
                    log_path=tmp_path / "fp16.h5", trace=False) as session:
        result = session.step(batch)
    assert result.scale == 1024.0 and session.probe.latest.scale == 1024.0
    with RunLog(tmp_path / "fp16.h5") as log:
        assert log.series("scaler/scale")[1].tolist() == [1024.0]


def test_an_existing_run_log_is_kept_unless_overwrite(tmp_path):
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    path = tmp_path / "once.h5"
    instrument(model, optimizer, nll_of_probs, log_path=path).close()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        instrument(model, optimizer, nll_of_probs, log_path=path, activations=True)
    assert hooks(model) == 0  # nothing was attached by the failed call
    instrument(model, optimizer, nll_of_probs, log_path=path, overwrite=True).close()


def test_loss_terms_and_batches():
    one = torch.tensor(1.0)
    assert list(loss_terms(one)) == ["total"]
    terms = loss_terms({"a": one, "b": 2 * one})
    assert list(terms) == ["total", "a", "b"] and float(terms["total"]) == 3.0
    assert float(loss_terms({"total": one, "a": 5 * one})["total"]) == 1.0
    with pytest.raises(ValueError, match="'a'"):
        loss_terms({"a": torch.ones(3)})
    with pytest.raises(ValueError, match="empty"):
        loss_terms({})
    batch = UserBatch({"x": torch.ones(2), "meta": ["id1", "id2"], "pair": (torch.zeros(1), 3)})
    moved = batch.to("cpu")
    assert moved.data["meta"] == ["id1", "id2"] and moved.data["pair"][1] == 3
    with pytest.raises(ValueError, match="precision"):
        instrument(MLP(), torch.optim.SGD(MLP().parameters(), lr=0.1), nll_of_probs, precision="fp8")


def test_own_loop_with_the_probe_alone():
    torch.manual_seed(0)
    model = GRUClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    batch = gru_batch(2)
    expected = group_norms_by_hand(model, ce_loss, batch, {"encoder": ["encoder.weight_ih_l0",
                                                                       "encoder.weight_hh_l0",
                                                                       "encoder.bias_ih_l0",
                                                                       "encoder.bias_hh_l0"]})
    probe = GradNormProbe(model, {"encoder": "encoder", "head": "head"})
    scaler.scale(ce_loss(model, batch)).backward()
    with pytest.raises(ValueError, match="unscale_"):
        probe.collect(optimizer, scaler)
    scaler.unscale_(optimizer)
    stats = probe.collect(optimizer, scaler)
    scaler.step(optimizer)
    scaler.update()
    assert stats.scale == 256.0
    assert stats.group_norm["encoder"] == pytest.approx(expected["encoder"], rel=1e-5)


class RootScaled(nn.Module):
    """A head plus a temperature registered on the root itself."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4) -> logits (B, 3)."""
        return self.head(x) / self.temperature


def test_updates_are_measured_and_root_parameters_have_a_group():
    from workbench.records.outcome import classify

    model = RootScaled()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with instrument(model, optimizer, ce_loss, trace=False) as session:
        for _ in range(3):
            session.step((torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)))
    assert session.probe.groups["(root)"] == ["temperature"]
    ratios = session.record.prefixed("update_ratio")
    assert set(ratios) == {"head", "(root)"} and all(v > 0 for v in ratios["(root)"])
    assert classify(session.record).kind != "unknown"


def test_a_root_parameter_left_out_of_the_optimizer_is_not_updated():
    model = RootScaled()
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2)  # the temperature was forgotten
    g = torch.Generator().manual_seed(0)
    with instrument(model, optimizer, ce_loss, trace=False) as session:
        for _ in range(3):
            session.step((torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)))
    assert session.record.values("not_updated/(root)") == [1, 1, 1]
    assert session.record.values("update_ratio/(root)") == [0.0, 0.0, 0.0]


def test_api_errors_say_what_was_wrong():
    class Parameterless(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ValueError, match="Parameterless has no parameters"):
        instrument(Parameterless(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), ce_loss)
    with pytest.raises(TypeError, match=r"returned int 3: expected a 0-d floating tensor"):
        loss_terms(3)
    with pytest.raises(TypeError, match=r"returned NoneType None"):
        loss_terms(None)
    with pytest.raises(TypeError, match=r"dtype torch.int64: expected a floating dtype"):
        loss_terms(torch.tensor(3))
    with pytest.raises(TypeError, match=r"term 'ce' is str"):
        loss_terms({"ce": "x"})
    model = GRUClassifier()
    with instrument(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: None, trace=False) as s:
        with pytest.raises(TypeError, match="NoneType None"):
            s.step(gru_batch(0))


def test_closing_the_session_removes_the_update_observers_hooks():
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    model = RootScaled()
    g = torch.Generator().manual_seed(0)
    with instrument(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, trace=False) as session:
        session.step((torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)))
        assert _global_optimizer_pre_hooks and any(p._backward_hooks for p in model.parameters())
    assert not _global_optimizer_pre_hooks and not _global_optimizer_post_hooks
    assert not any(p._backward_hooks for p in model.parameters())
    assert session.record.values("stale_grad/head") == [0]

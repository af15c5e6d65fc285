"""Each torch / Lightning internal in workbench.train.compat, checked against the installed versions: a release that
renames or moves one fails here, naming it, instead of silently in an instrument."""

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from workbench.train import compat


def _scaled_step(init_scale: float) -> tuple[torch.amp.GradScaler, torch.optim.Optimizer, bool]:
    """One GradScaler step of a linear layer on the CPU; returns (scaler, optimizer, unscaled before step)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    loss = (model(torch.randn(3, 4)) * 1000.0).sum()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    was_unscaled = compat.unscaled(scaler, optimizer)
    scaler.step(optimizer)
    return scaler, optimizer, was_unscaled


def test_grad_scaler_internals_give_scale_and_skip_verdict():
    scaler, optimizer, was_unscaled = _scaled_step(init_scale=2.0 ** 10)
    assert was_unscaled
    found = compat.found_inf(scaler, optimizer)
    assert found and all(isinstance(f, torch.Tensor) for f in found)
    assert sum(float(f) for f in found) == 0.0
    scale = compat.scale_tensor(scaler)
    assert isinstance(scale, torch.Tensor) and float(scale) == scaler.get_scale() == 2.0 ** 10
    scaler.update()
    assert not compat.unscaled(scaler, optimizer)  # update() resets the per-optimizer state


def test_grad_scaler_found_inf_is_set_by_a_real_overflow():
    # loss * 1e38 overflows float32 in backward: the scaler's own inf check must see it and skip.
    scaler, optimizer, _ = _scaled_step(init_scale=1e38)
    assert sum(float(f) for f in compat.found_inf(scaler, optimizer)) > 0


def test_scale_tensor_is_none_before_the_first_scale():
    assert compat.scale_tensor(torch.amp.GradScaler("cpu")) is None
    assert compat.growth_tracker(torch.amp.GradScaler("cpu")) is None


def test_growth_tracker_is_the_count_state_dict_reports():
    scaler, _, _ = _scaled_step(init_scale=2.0 ** 10)
    scaler.update()
    tracker = compat.growth_tracker(scaler)
    assert isinstance(tracker, torch.Tensor) and int(tracker) == scaler.state_dict()["_growth_tracker"] == 1


def test_tensor_version_counts_in_place_writes():
    t = torch.zeros(3)
    before = compat.tensor_version(t)
    t.add_(1.0)
    assert compat.tensor_version(t) == before + 1


def test_foreach_ops_match_their_per_tensor_meaning():
    ts = [torch.randn(5), torch.randn(2, 3)]
    norms = compat.foreach_norm(ts, 2, dtype=torch.float32)
    assert torch.allclose(torch.stack(list(norms)), torch.stack([torch.linalg.vector_norm(t) for t in ts]))
    maxs = compat.foreach_max(compat.foreach_abs(ts))
    assert [float(m) for m in maxs] == [float(t.abs().max()) for t in ts]
    copies = [torch.empty_like(t) for t in ts]
    compat.foreach_copy_(copies, ts)
    compat.foreach_sub_(copies, ts)
    compat.foreach_mul_(copies, 2.0)
    assert all(float(c.abs().sum()) == 0.0 for c in copies)


def test_state_dict_metadata_round_trip():
    state = nn.BatchNorm1d(3).state_dict()
    metadata = compat.state_dict_metadata(state)
    assert metadata is not None and metadata[""]["version"] >= 2
    copy_ = OrderedDict(state)
    compat.set_state_dict_metadata(copy_, metadata)
    assert compat.state_dict_metadata(copy_) is metadata


def test_dispatch_mode_schema_pytree_and_autograd_node():
    seen: list[tuple[str, list[str]]] = []
    nodes: list[object] = []

    class Names(compat.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((str(func.overloadpacket), [a.name for a in compat.op_arguments(func)]))
            return func(*args, **(kwargs or {}))

    x = torch.ones(2, requires_grad=True)
    with Names():
        torch.add(x, x)
    assert ("aten.add", ["self", "other", "alpha"]) in seen
    assert compat.tree_flatten([1, (2, {"a": 3})])[0] == [1, 2, 3]
    assert compat.current_autograd_node() is None
    y = x * 2
    y.register_hook(lambda g: nodes.append(compat.current_autograd_node()))
    y.sum().backward()
    assert nodes and nodes[0] is not None


def test_module_hook_dicts_are_all_there_and_hold_the_hooks():
    module = nn.Linear(2, 2)
    names = compat._MODULE_HOOK_DICTS
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"nn.Module no longer has {missing}"
    handle = module.register_forward_hook(lambda *a: None)
    assert any(handle.id in d for d in compat.module_hook_dicts(module))


def test_scheduler_internals():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    first = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    second = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    chained = torch.optim.lr_scheduler.SequentialLR(optimizer, [first, second], milestones=[2])
    assert compat.scheduler_children(chained) == [first, second]
    assert compat.scheduler_children(first) == []
    lists = compat.scheduler_group_lists(first)
    assert {"base_lrs", "_last_lr", "lr_lambdas"} <= set(lists)
    assert lists["_last_lr"] == first.get_last_lr()  # the private list is what the public getter returns


def test_attached_trainer_puts_back_what_was_there():
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        pass

    module, fake = Module(), object()
    with compat.attached_trainer(module, fake):
        assert module.trainer is fake
    assert module._trainer is None
    with pytest.raises(RuntimeError):
        module.trainer  # noqa: B018  (the public getter raises when none is attached)


def test_queue_backward_callback_runs_after_the_backward():
    order: list[str] = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2

    def hook(grad: torch.Tensor) -> None:
        compat.queue_backward_callback(lambda: order.append("after"))
        order.append("hook")

    y.register_hook(hook)
    y.sum().backward()
    assert order == ["hook", "after"]

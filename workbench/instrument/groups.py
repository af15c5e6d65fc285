"""Named parameter groups: the semantic units (encoder, encoder.layers.3, joint, ...) statistics are reported by."""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping, Sequence

import torch.nn as nn

class ParamGroups(Mapping[str, list[str]]):
    """Ordered mapping group name -> parameter names (as `model.named_parameters()` spells them).

    A parameter may belong to several groups (`encoder` and `encoder.layers.0`).
    """

    def __init__(self, groups: Mapping[str, Sequence[str]]) -> None:
        self._groups = {name: list(params) for name, params in groups.items()}

    def __getitem__(self, name: str) -> list[str]:
        return self._groups[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}: {len(params)}" for name, params in self._groups.items())
        return f"ParamGroups({sizes})"


def _matcher(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda name: regex.search(name) is not None
    return lambda name: name == pattern or name.startswith(pattern + ".")


def groups_from_patterns(model: nn.Module, patterns: Mapping[str, str | Sequence[str]]) -> ParamGroups:
    """Group `model`'s parameters by name patterns, one pattern or a list of them per group.

    A plain pattern is a name prefix: it matches `prefix` itself and `prefix.<anything>` (so `encoder.layers.1`
    does not match `encoder.layers.10`). A pattern starting with `re:` is a regular expression searched in the
    parameter name. Every pattern must match at least one parameter: a typo raises ValueError naming it.
    """
    names = [name for name, _ in model.named_parameters()]
    groups: dict[str, list[str]] = {}
    for group, spec in patterns.items():
        specs = [spec] if isinstance(spec, str) else list(spec)
        members: set[str] = set()
        for pattern in specs:
            match = _matcher(pattern)
            hits = {name for name in names if match(name)}
            if not hits:
                raise ValueError(f"parameter group {group!r}: pattern {pattern!r} matches no parameter")
            members |= hits
        groups[group] = [name for name in names if name in members]
    return ParamGroups(groups)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def default_groups(model: nn.Module) -> ParamGroups:
    """Groups for `model`: the model's own, when it defines `param_groups()` (a mapping group name ->
    pattern(s), as `groups_from_patterns` takes; the reference model names its encoder layers and decoder parts
    this way), else one group per top-level child with parameters. Parameters registered directly on the root
    belong to no group (they still count in per-parameter and global statistics)."""
    own = getattr(model, "param_groups", None)
    if callable(own):
        return groups_from_patterns(model, own())
    kept = [name for name, child in model.named_children() if _has_params(child)]
    return groups_from_patterns(model, {name: name for name in kept})

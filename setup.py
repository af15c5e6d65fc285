"""The wheel carries the checkout's notebooks/ and data_samples/ as workbench/shipped/ (read by
workbench.views.notebook), so `workbench notebooks` runs from an installed wheel. The metadata is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

FOLDERS = ("notebooks", "data_samples")


class BuildPyWithNotebooks(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:   # an editable install reads the checkout's own folders
            return
        for name in FOLDERS:
            target = Path(self.build_lib) / "workbench" / "shipped" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).parent / name, target,
                            ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))


setup(cmdclass={"build_py": BuildPyWithNotebooks})

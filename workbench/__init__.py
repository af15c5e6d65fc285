"""RNN-T Stability Workbench: reproduce, localise and measure NaN/Inf at the CTC-warmup -> joint transition."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["watch"]


def __getattr__(name: str) -> Any:
    # `watch` loads torch and the instruments on first use, so `import workbench` stays light.
    if name == "watch":
        from workbench.run.watch import watch
        return watch
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")

"""RNN-T Stability Workbench: reproduce, localise and measure NaN/Inf at the CTC-warmup -> joint transition."""

__version__ = "0.1.0"

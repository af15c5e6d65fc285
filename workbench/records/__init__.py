"""Run records: one HDF5 run log per training run (series of per-step values plus JSON event tables)."""

from workbench.records.runlog import FORMAT, FORMAT_VERSION, RunLog, RunLogWriter, from_json, to_json

__all__ = ["FORMAT", "FORMAT_VERSION", "RunLog", "RunLogWriter", "from_json", "to_json"]

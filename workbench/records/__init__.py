"""Run records: the HDF5 run log, the one in-memory record of a run, its per-step recorder and its summary."""

from workbench.records.record import RunRecord, read_record
from workbench.records.recorder import Recorder
from workbench.records.runlog import FORMAT, FORMAT_VERSION, RunLog, RunLogWriter, from_json, json_safe, to_json
from workbench.records.summary import summarize

__all__ = ["FORMAT", "FORMAT_VERSION", "Recorder", "RunLog", "RunLogWriter", "RunRecord", "from_json", "json_safe",
           "read_record", "summarize", "to_json"]

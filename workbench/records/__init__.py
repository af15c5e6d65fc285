"""Run records: the HDF5 run log, the one in-memory record of a run, its per-step recorder, its summary, its
outcome (diverged, overflow_skipped, stalled, unknown, inconclusive, healthy) and the causal chain of its non-finite values."""

from workbench.records.record import RunRecord, read_record
from workbench.records.recorder import Recorder
from workbench.records.runlog import (
    FORMAT, FORMAT_VERSION, RunLog, RunLogError, RunLogWriter, describe_log, from_json, json_safe, to_json,
)
from workbench.records.outcome import OUTCOMES, Outcome, OutcomeRules, classify
from workbench.records.summary import summarize

__all__ = ["FORMAT", "FORMAT_VERSION", "OUTCOMES", "Outcome", "OutcomeRules", "Recorder", "RunLog", "RunLogError",
           "RunLogWriter", "RunRecord", "classify", "describe_log", "from_json", "json_safe", "read_record",
           "summarize", "to_json"]

"""Data layer: B2T vocabulary, validating HDF5 reader and batcher, synthetic generator in the real layout."""

from workbench.data.b2t import (
    SPLITS,
    B2TDataset,
    Batch,
    DataError,
    Trial,
    TrialRef,
    collate,
    find_session_files,
    index_file,
    list_sessions,
    make_loader,
    summarize,
)
from workbench.data.synth import SynthConfig, b2t_lengths, large_val_dataset, real_length_dataset, write_dataset
from workbench.data.vocab import BLANK, PHONEMES, SIL, VOCAB_SIZE, ids_to_symbols, sentence_to_ids

__all__ = [
    "BLANK",
    "PHONEMES",
    "SIL",
    "SPLITS",
    "VOCAB_SIZE",
    "B2TDataset",
    "Batch",
    "DataError",
    "SynthConfig",
    "Trial",
    "TrialRef",
    "b2t_lengths",
    "collate",
    "find_session_files",
    "ids_to_symbols",
    "index_file",
    "large_val_dataset",
    "list_sessions",
    "make_loader",
    "real_length_dataset",
    "sentence_to_ids",
    "summarize",
    "write_dataset",
]

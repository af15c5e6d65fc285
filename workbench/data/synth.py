"""Synthetic Brain-to-Text data written in exactly the published HDF5 layout (see `workbench.data.b2t`).

Generative model, per trial:
1. A real English sentence -> phoneme ids (`vocab.sentence_to_ids`: stress removed, SIL after each word).
2. Each id, SIL included, has a fixed tuning pattern over the 256 electrodes for the threshold-crossing
   half (cols 0-255) and for the spike-band-power half (cols 256-511, correlated with but not equal to it).
3. Each id lasts 5-9 bins of 20 ms, framed by rest bins (no modulation); the pattern sequence is smoothed
   with a short Gaussian kernel and scaled by the speaking mode (silent = weaker modulation).
4. Independent per-channel noise, then a per-session drift (offset and gain per channel), then z-scoring.
The synthetic-only attribute `speaking_mode` (0 = silent, 1 = vocalized) records step 3's mode; the real
release does not publish it.

`lengths="b2t"` gives trials the lengths of the real release instead (see `b2t_lengths`): several sentences
per trial, and step 3's bins stretched to the drawn number of frames. `real_length_dataset` caches such a set.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import h5py
import numpy as np

from workbench.data.b2t import MAX_LABEL_LEN, N_FEATURES, SPLITS
from workbench.data.vocab import VOCAB_SIZE, sentence_to_ids

# Real English sentences, one per line, in a fixed order (the committed sample depends on it).
SENTENCES: tuple[str, ...] = tuple(
    (resources.files("workbench.data") / "sentences.txt").read_text(encoding="utf-8").splitlines())

_FIRST_SESSION = datetime.date(2023, 8, 13)
_TRIALS_PER_BLOCK = 10

# Real-release statistics: third-party figures computed over every trial of the release
# (anikbiswas730/brain-to-text-decoder results/dataset_summary.csv, OzgurMertEmir/brain-to-text-25), as compiled in
# the project's notes on the Brain-to-Text '25 format (section 3.2).
B2T_FRAMES: dict[str, tuple[float, float, int]] = {  # n_time_steps (20 ms bins): mean, median, max per split
    "train": (874.8, 836.0, 2475),
    "val": (922.1, 890.5, 2382),
    "test": (916.6, 894.0, 2140),
}
B2T_MIN_FRAMES = 138  # the smallest seen in session t15.2023.08.11 (read by eye; whole-set minimum unpublished)
# Val: 31,947 phoneme labels (SIL included) over 1,426 trials = 22.4 per trial, at a mean of 922.1 frames.
B2T_PHONEMES_PER_FRAME = 31947 / 1426 / 922.1
# Log-sd of a trial's phonemes per frame around that rate: an assumption, no spread is published.
_RATE_SPREAD = 0.25
LENGTHS = ("sample", "b2t")
MAX_FRACTION = 5.0
# The validation split the studies score on: data_samples' training trials (byte-identical) with this many
# validation trials per session instead of 5, so that the differences discussed are many errors, not one.
VAL_TRIALS = 40


@dataclass(frozen=True)
class SynthConfig:
    """Generator knobs. Tuning patterns have unit variance per channel; noise levels are relative to that."""

    # inclusive ranges of 20 ms bins per id, and of rest bins before and after speech
    frames_per_phoneme: tuple[int, int] = (5, 9)
    rest_frames: tuple[int, int] = (3, 8)
    smooth_sigma: float = 1.5  # Gaussian smoothing, in bins
    channel_noise: float = 0.5  # std of the independent noise
    sbp_correlation: float = 0.8  # correlation of an electrode's SBP tuning with its TC tuning
    # std of the per-session channel offset, and of the log channel gain
    drift_offset: float = 0.5
    drift_gain: float = 0.3
    silent_gain: float = 0.5  # modulation scale of silent (speaking_mode 0) trials
    quantum: float = 1 / 64  # resolution of the stored values


@dataclass(frozen=True)
class _Trial:
    features: np.ndarray
    ids: list[int]
    sentence: str
    mode: int


def session_names(count: int) -> list[str]:
    """`count` real-looking session names a week apart, starting at t15.2023.08.13."""
    days = (_FIRST_SESSION + datetime.timedelta(weeks=k) for k in range(count))
    return [f"t15.{d.year:04d}.{d.month:02d}.{d.day:02d}" for d in days]


def _make_tuning(rng: np.random.Generator, config: SynthConfig) -> np.ndarray:
    """Tuning patterns (41, 512), one row per id (row 0, BLANK, is never spoken)."""
    tc = rng.standard_normal((VOCAB_SIZE, N_FEATURES // 2))
    rho = config.sbp_correlation
    sbp = rho * tc + np.sqrt(1 - rho**2) * rng.standard_normal(tc.shape)
    return np.concatenate([tc, sbp], axis=1)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def b2t_lengths(split: str, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Frames T and target phoneme counts U of `count` trials, each (count,) int64, as in the real `split`.

    T is log-normal with the split's published median and mean (`B2T_FRAMES`), clipped to
    [`B2T_MIN_FRAMES`, the split's max]. U = T x a per-trial phoneme rate, log-normal around
    `B2T_PHONEMES_PER_FRAME` (22.4 phonemes at the val mean T), so longer trials carry more phonemes;
    U is at least 1 and at most T // 2 and half the 500-id storage bound.
    """
    if split not in B2T_FRAMES:
        raise ValueError(f"split: expected one of {', '.join(B2T_FRAMES)}, got {split!r}")
    mean, median, most = B2T_FRAMES[split]
    sigma = np.sqrt(2 * np.log(mean / median))  # a log-normal's mean / median = exp(sigma^2 / 2)
    frames = np.clip(np.round(median * np.exp(sigma * rng.standard_normal(count))), B2T_MIN_FRAMES, most)
    rate = B2T_PHONEMES_PER_FRAME * np.exp(_RATE_SPREAD * rng.standard_normal(count) - _RATE_SPREAD**2 / 2)
    labels = np.clip(np.round(frames * rate), 1, np.minimum(frames // 2, MAX_LABEL_LEN // 2))
    return frames.astype(np.int64), labels.astype(np.int64)


def _stretch(pieces: np.ndarray, n_frames: int) -> np.ndarray:
    """Durations scaled to sum to `n_frames`, in proportion to `pieces`, at least one frame each."""
    extra = n_frames - len(pieces)
    bounds = np.round(np.cumsum(pieces) * extra / pieces.sum()).astype(np.int64)
    return 1 + np.diff(bounds, prepend=0)


def _trial_features(ids: list[int], mode: int, tuning: np.ndarray, offset: np.ndarray, gain: np.ndarray,
                    rng: np.random.Generator, config: SynthConfig, n_frames: int | None = None) -> np.ndarray:
    """Features (T, 512) float32 for one phoneme id sequence; T = rest + 5-9 bins per id + rest.

    With `n_frames`, those bins are stretched in proportion so that T = n_frames (needs n_frames >= L + 2).
    """
    low, high = config.frames_per_phoneme
    durations = rng.integers(low, high + 1, size=len(ids))
    lead, tail = rng.integers(config.rest_frames[0], config.rest_frames[1] + 1, size=2)
    pieces = np.concatenate([[lead], durations, [tail]])
    if n_frames is not None:
        pieces = _stretch(pieces, n_frames)
    frame_ids = np.repeat(np.concatenate([[-1], ids, [-1]]), pieces)
    speaking = np.flatnonzero(frame_ids >= 0)
    one_hot = np.zeros((len(frame_ids), VOCAB_SIZE))
    one_hot[speaking, frame_ids[speaking]] = 1.0
    # Smoothing the one-hot sequence before the (linear) tuning equals smoothing all 512 channels, 12x cheaper.
    kernel = _gaussian_kernel(config.smooth_sigma)
    smoothed = np.stack([np.convolve(column, kernel, mode="same") for column in one_hot.T], axis=1)
    modulation = 1.0 if mode == 1 else config.silent_gain
    signal = modulation * (smoothed @ tuning) + config.channel_noise * rng.standard_normal((len(frame_ids), N_FEATURES))
    signal = signal * gain + offset
    # One mean and std for the whole trial: per-channel z-scoring would erase the session drift entirely.
    features = (signal - signal.mean()) / signal.std()
    # Quantised to multiples of `quantum` so that shuffle + gzip shrink the committed sample to a few MB.
    return (np.round(features / config.quantum) * config.quantum).astype(np.float32)


@contextlib.contextmanager
def _replace_when_done(path: Path) -> Iterator[Path]:
    """A temporary name next to `path` that replaces `path` only when the block completes.

    An interrupted run therefore never leaves a truncated file under the real name.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_split(path: Path, session: str, trials: list[_Trial], first_block: int, labelled: bool,
                 mode_labels: bool, gzip_level: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replace_when_done(path) as temporary, h5py.File(temporary, "w") as handle:
        for i, trial in enumerate(trials):
            group = handle.create_group(f"trial_{i:04d}")
            # track_times=False keeps modification times out of the file so that output is byte-reproducible.
            group.create_dataset("input_features", data=trial.features, chunks=trial.features.shape,
                                 compression="gzip", compression_opts=gzip_level, shuffle=True, track_times=False)
            group.attrs["n_time_steps"] = np.int64(trial.features.shape[0])
            group.attrs["block_num"] = np.int64(first_block + i // _TRIALS_PER_BLOCK)
            group.attrs["trial_num"] = np.int64(i % _TRIALS_PER_BLOCK)
            group.attrs["session"] = session
            if mode_labels:
                group.attrs["speaking_mode"] = np.int64(trial.mode)
            if labelled:
                for name, values in (("seq_class_ids", trial.ids), ("transcription", [ord(c) for c in trial.sentence])):
                    padded = np.zeros(MAX_LABEL_LEN, dtype=np.int32)
                    padded[: len(values)] = values
                    group.create_dataset(name, data=padded, compression="gzip", compression_opts=gzip_level,
                                         shuffle=True, track_times=False)
                group.attrs["seq_len"] = np.int64(len(trial.ids))
                group.attrs["sentence_label"] = trial.sentence


def _make_trial(sentence: str, tuning: np.ndarray, offset: np.ndarray, gain: np.ndarray, rng: np.random.Generator,
                config: SynthConfig) -> _Trial:
    ids = sentence_to_ids(sentence)
    mode = int(rng.integers(0, 2))
    return _Trial(_trial_features(ids, mode, tuning, offset, gain, rng, config), ids, sentence, mode)


def _make_b2t_trials(split: str, count: int, sentences: Iterator[str], tuning: np.ndarray, offset: np.ndarray,
                     gain: np.ndarray, rng: np.random.Generator, config: SynthConfig) -> list[_Trial]:
    """`count` trials with real-release lengths (`b2t_lengths`): whole sentences from `sentences`, joined.

    Sentences are added while that brings the phoneme count closer to the drawn U (so U is met to within
    half a sentence), never past T // 2 ids or the 500-character transcription bound.
    """
    frames, targets = b2t_lengths(split, count, rng)
    made = []
    following = next(sentences)
    for n_frames, target in zip(frames.tolist(), targets.tolist()):
        texts: list[str] = []
        ids: list[int] = []
        limit = min(n_frames // 2, MAX_LABEL_LEN)
        while True:
            more = sentence_to_ids(following)
            text = " ".join([*texts, following])
            fits = len(ids) + len(more) <= limit and len(text) < MAX_LABEL_LEN
            if texts and not (fits and abs(len(ids) + len(more) - target) < abs(len(ids) - target)):
                break
            texts.append(following)
            ids += more
            following = next(sentences)
        mode = int(rng.integers(0, 2))
        features = _trial_features(ids, mode, tuning, offset, gain, rng, config, n_frames)
        made.append(_Trial(features, ids, " ".join(texts), mode))
    return made


def _write_checksums(out_dir: Path, paths: list[Path]) -> None:
    """`SHA256SUMS` in `sha256sum` format, paths relative to `out_dir`."""
    relative = sorted(path.relative_to(out_dir).as_posix() for path in paths)
    lines = [f"{hashlib.sha256((out_dir / rel).read_bytes()).hexdigest()}  {rel}\n" for rel in relative]
    with _replace_when_done(out_dir / "SHA256SUMS") as temporary:
        temporary.write_text("".join(lines))


def write_dataset(out_dir: str | Path, sessions: int = 2, trials: int = 24, seed: int = 0,
                  val_fraction: float = 0.25, test_fraction: float = 0.25, mode_labels: bool = True,
                  config: SynthConfig = SynthConfig(), lengths: str = "sample", overwrite: bool = False) -> list[Path]:
    """Write `<out_dir>/t15.YYYY.MM.DD/data_{train,val,test}.hdf5` and `<out_dir>/SHA256SUMS`.

    `trials` train trials per session; val and test get round(trials * fraction) each (a fraction may exceed 1, up
    to MAX_FRACTION, for a validation split larger than the training one), and a split with none gets no file (as
    in the real sessions without val/test). The train split is drawn first, so it does not depend on the fractions.
    Speaking modes are always drawn;
    `mode_labels=False` leaves the `speaking_mode` attribute out, as in the real release.
    `lengths="sample"`: one short sentence per trial, 5-9 frames per phoneme plus rest. `lengths="b2t"`:
    frames and phoneme counts drawn from the real release's statistics (`b2t_lengths`), several sentences
    per trial.
    Output is byte-identical for equal arguments. Session k's data do not depend on how many sessions are
    made. Existing output files are an error (FileExistsError naming one, nothing written) unless
    `overwrite`; each file is written under a temporary name and renamed, so none is ever left truncated.
    Returns the written .hdf5 paths, session by session in train, val, test order.
    """
    if sessions < 1 or trials < 1:
        raise ValueError(f"sessions and trials: expected at least 1 each, got {sessions} and {trials}")
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction <= MAX_FRACTION:
            raise ValueError(f"{name}: expected 0..{MAX_FRACTION}, got {fraction}")
    if lengths not in LENGTHS:
        raise ValueError(f"lengths: expected one of {', '.join(LENGTHS)}, got {lengths!r}")
    out_dir = Path(out_dir)
    names = session_names(sessions)
    stale = sorted(p.name for p in out_dir.glob("t15*") if p.name not in names) if out_dir.is_dir() else []
    if stale:
        raise ValueError(f"{out_dir}: holds sessions this generation would not rewrite ({', '.join(stale)}); "
                         "use an empty folder or remove them")
    counts = {"train": trials, "val": int(trials * val_fraction + 0.5), "test": int(trials * test_fraction + 0.5)}
    outputs = [out_dir / session / f"data_{split}.hdf5" for session in names for split in SPLITS if counts[split]]
    existing = [path for path in [*outputs, out_dir / "SHA256SUMS"] if path.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of the files it would write)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}: exists{more}; write_dataset replaces existing files only with "
                              "overwrite=True")
    # Real-length trials are ~8x longer than the sample's: gzip level 1 writes them ~10x faster than level 9
    # for ~5% more bytes. The sample keeps level 9 (its committed bytes depend on it).
    gzip_level = 1 if lengths == "b2t" else 9
    world, *session_seeds = np.random.SeedSequence(seed).spawn(sessions + 1)
    tuning = _make_tuning(np.random.default_rng(world), config)
    written = []
    for session, session_seed in zip(names, session_seeds):
        rng = np.random.default_rng(session_seed)
        offset = config.drift_offset * rng.standard_normal(N_FEATURES)
        gain = np.exp(config.drift_gain * rng.standard_normal(N_FEATURES))
        # Sentences are drawn without replacement within a session, so val/test sentences are unseen there
        # (until the session has used all of them: then the order starts again).
        order = rng.permutation(len(SENTENCES))
        sentences = (SENTENCES[order[k % len(order)]] for k in itertools.count())
        block = 1
        for split in SPLITS:
            count = counts[split]
            if count == 0:
                continue
            if lengths == "b2t":
                made = _make_b2t_trials(split, count, sentences, tuning, offset, gain, rng, config)
            else:
                made = [_make_trial(next(sentences), tuning, offset, gain, rng, config) for _ in range(count)]
            path = out_dir / session / f"data_{split}.hdf5"
            _write_split(path, session, made, block, split != "test", mode_labels, gzip_level)
            block += -(-count // _TRIALS_PER_BLOCK)
            written.append(path)
    _write_checksums(out_dir, written)
    return written


def _cached(root: Path, write: Callable[[Path], object]) -> Path:
    """`root`, written by `write(folder)` on first use. It is written into a temporary folder unique to this call
    and renamed into place, so the root is always complete; when two processes race, the loser discards its copy
    and returns the winner's folder."""
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(temporary)
        try:
            # Atomic; fails when another process has already renamed its (complete) copy into place.
            os.rename(temporary, root)
        except OSError:
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return root


def real_length_dataset(cache_dir: str | Path = "runs/data", sessions: int = 2, trials: int = 40,
                        seed: int = 0) -> Path:
    """The root of a real-length synthetic set (`write_dataset(..., lengths="b2t")`), generated on first use.

    The root is `<cache_dir>/b2t_lengths_s{sessions}_t{trials}_seed{seed}` and is reused when present.
    """
    root = Path(cache_dir) / f"b2t_lengths_s{sessions}_t{trials}_seed{seed}"
    return _cached(root, lambda folder: write_dataset(folder, sessions=sessions, trials=trials, seed=seed,
                                                      lengths="b2t"))


def large_val_dataset(cache_dir: str | Path = "runs/data", val_trials: int = VAL_TRIALS) -> Path:
    """The committed sample's generation (`data_samples/`: 2 sessions, 20 training trials each, seed 0) with
    `val_trials` validation trials per session, generated on first use into `<cache_dir>/sample_val{val_trials}`.

    Its training files are byte-identical to `data_samples/`'s (the training trials are drawn first); its
    validation trials are sentences the session's training split does not hold (while the session's sentences
    last: 202 per session).
    """
    root = Path(cache_dir) / f"sample_val{val_trials}"
    return _cached(root, lambda folder: write_dataset(folder, sessions=2, trials=20, seed=0,
                                                      val_fraction=val_trials / 20))

"""Gradient and activation instrumentation: sync-free on the device, one host copy per probe per step.

- `GradNormProbe`: gradient norm, max |g| and non-finite count per parameter, per group and globally, plus
  the GradScaler scale and (opt-in) per-group update ratios.
- `OptimizerCoverage`: trainable parameters with gradients the optimizer does not hold, and frozen ones it does.
- `ActivationStats`: opt-in forward-hook max |a|, RMS and non-finite count per module.
- `groups_from_patterns` / `default_groups`: the named parameter groups the statistics are reported by.
- `LossAttribution`: gradient norm each group receives from each loss term, on the step's own forward.
- `NonFiniteTracer` / `localize`: replay a step from a `ReplayBundle` and name the first non-finite tensor.

Every device-to-host copy goes through `workbench.instrument.host.to_host` (counted in
`workbench.train.host.HOST_COPIES`). Under a TrainStep the instruments queue their device values in the step's
`HostPacket` (`ctx.packet`) and the step moves them with its own values in one copy: the probe, coverage,
activation statistics and the tracer's check add no copy of their own. Without a TrainStep, `collect()` copies
once per call.
"""

from workbench.instrument.activations import ActivationStats, leaf_modules_with_params
from workbench.instrument.attribution import Attribution, LossAttribution, attribute
from workbench.instrument.coverage import CoverageFinding, OptimizerCoverage
from workbench.instrument.grad_norms import GradNormProbe, StepStats
from workbench.instrument.observer import StepObserver
from workbench.instrument.groups import ParamGroups, default_groups, groups_from_patterns
from workbench.instrument.host import to_host
from workbench.instrument.replay import ReplayBundle, bundle_rng, capture, load_bundle, replica, save_bundle
from workbench.instrument.tracer import EXPECTED_NONFINITE, NonFiniteTracer, Verdict, localize

__all__ = [
    "EXPECTED_NONFINITE", "ActivationStats", "Attribution", "CoverageFinding", "GradNormProbe", "LossAttribution",
    "NonFiniteTracer", "OptimizerCoverage", "ParamGroups", "ReplayBundle", "StepObserver", "StepStats", "Verdict",
    "attribute", "bundle_rng", "capture", "default_groups", "groups_from_patterns", "leaf_modules_with_params",
    "load_bundle", "localize", "replica", "save_bundle", "to_host",
]

"""The instruments' device-to-host boundary: `workbench.train.host`, whose `to_host` every probe copies through.

Under a TrainStep the probes do not copy on their own: they queue their statistics in the step's `HostPacket`
(`ctx.packet`), which moves the step's values and theirs in one `to_host` copy. Without a TrainStep
(`GradNormProbe.collect`, `ActivationStats.collect`) a probe copies once itself. `workbench.train.host.HOST_COPIES`
counts every copy.
"""

from workbench.train.host import HostPacket, Slot, surely_finite, to_host

__all__ = ["HostPacket", "Slot", "surely_finite", "to_host"]

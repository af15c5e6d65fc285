"""The one device-to-host boundary of the instrumentation.

Every probe in `workbench.instrument` moves its statistics to the host only through `to_host`, so
`HOST_COPIES` counts every device-to-host copy (and so every host sync) the instrumentation makes; tests
read it to prove a step costs one copy per probe.
"""

from __future__ import annotations

import numpy as np
import torch

HOST_COPIES = 0


def to_host(t: torch.Tensor) -> np.ndarray:
    """Copy `t` (any shape, a numpy-representable dtype; the probes pass flat float32) to a new host array.

    Always copies, even for a CPU tensor, so a probe may overwrite its device buffer right after the call.
    """
    global HOST_COPIES
    HOST_COPIES += 1
    return t.detach().to("cpu", copy=True).numpy()

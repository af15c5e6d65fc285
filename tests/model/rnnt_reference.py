r"""A minimal pure-torch RNN-T loss (forward algorithm in log space) used only to check torchaudio.

.. math::
    \alpha(0, 0) = 0, \quad
    \alpha(t, u) = \operatorname{logaddexp}\big(\alpha(t-1, u) + \log p(\varnothing \mid t-1, u),\;
                                               \alpha(t, u-1) + \log p(y_u \mid t, u-1)\big), \quad
    \mathcal{L} = -\big(\alpha(T-1, U) + \log p(\varnothing \mid T-1, U)\big)

Written for clarity, not speed: every lattice node is a scalar autograd node, so gradients with respect to the
logits come from autograd.
"""

from __future__ import annotations

import torch


def rnnt_nll(logits: torch.Tensor, targets: torch.Tensor, blank: int = 0) -> torch.Tensor:
    """Negative log-likelihood of one utterance.

    Args:
        logits (Tensor): (T, U + 1, V) joint logits of this utterance (unpadded).
        targets (Tensor): (U,) labels.
        blank (int): blank index.

    Returns:
        Tensor: scalar NLL in the logits' dtype.
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    frames, nodes = log_probs.shape[:2]
    alpha: list[list[torch.Tensor]] = [[log_probs.new_zeros(())] * nodes for _ in range(frames)]
    for t in range(frames):
        for u in range(nodes):
            if t == 0 and u == 0:
                continue
            paths = []
            if t > 0:
                paths.append(alpha[t - 1][u] + log_probs[t - 1, u, blank])
            if u > 0:
                paths.append(alpha[t][u - 1] + log_probs[t, u - 1, targets[u - 1]])
            alpha[t][u] = torch.logsumexp(torch.stack(paths), dim=0)
    return -(alpha[frames - 1][nodes - 1] + log_probs[frames - 1, nodes - 1, blank])

"""The non-finite flags of parameter tensors say whether a tensor holds a NaN or inf, not whether its norm
overflows."""

import torch

from workbench.train.host import nonfinite_flags


def test_a_finite_tensor_whose_norm_overflows_is_not_flagged():
    tensors = [torch.full((4,), 1e30), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf"), 0.0]),
               torch.tensor([1.0, 2.0], dtype=torch.float16), torch.tensor([float("nan")], dtype=torch.bfloat16)]
    assert nonfinite_flags(tensors).tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]

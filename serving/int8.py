"""Int8 linear layers for the server: fbgemm's dynamic int8 linear with prepacked weights.

At batch 1 a decode step reads every weight once, so its speed is set by memory bandwidth
and by the bytes of the weights. Each weight matrix is quantized once, symmetrically per
output row (one float scale per row, int8 values), and packed into fbgemm's blocked
layout (`torch.ops.quantized.linear_prepack`). At run time `linear_dynamic` quantizes the
activations per call (one scale for the whole input, computed from its range), multiplies
in integers and rescales to float: a quarter of the fp32 bytes are read.

Why these kernels: on a 2-vCPU Xeon with torch 2.13, one thread, they ran an MLP matrix
(3072 x 768) at batch 1 in 0.16 ms against 0.70 ms for the best fp32 path, and the output
layer (50257 x 768) in 4.5 ms against 12.5 ms; `torch._weight_int8pack_mm` (int8 weights,
float activations) took 2.3 ms and 66 ms, slower than fp32. fbgemm picks AVX2 or AVX-512
code at run time, so the same packed weight serves both.

Activations use 7 bits (`reduce_range`): without VNNI, fbgemm multiplies unsigned 8-bit
activations by signed 8-bit weights with an instruction that saturates a pair's sum at
16 bits, and 7-bit activations keep that sum in range on every x86 CPU.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F

# fbgemm's packed weight keeps the bias in float; the activations' 7-bit range is explained above.
REDUCE_RANGE = True


def int8_available() -> bool:
    """Whether this torch build has the fbgemm int8 kernels (x86 builds do)."""
    engines = torch.backends.quantized.supported_engines
    return ("fbgemm" in engines or "x86" in engines) and hasattr(torch.ops.quantized, "linear_dynamic")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (int8 values, float scales) with weight ~= values * scales[:, None]."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # an all-zero row still gets a scale
    values = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return values, scales


class Int8Linear:
    """y = x @ W.T + b with W held as int8 per row; optionally followed by GELU (tanh form)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool = False):
        if weight.device.type != "cpu":
            raise ValueError(f"int8 weights run on the CPU only, not on {weight.device}")
        if not int8_available():
            raise RuntimeError("this torch build has no fbgemm int8 kernels (torch.backends.quantized)")
        values, scales = quantize_rows(weight)
        self.out_features, self.in_features = values.shape
        self.gelu = gelu
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # torch.ao's quantized tensors carry a deprecation notice; the fbgemm kernels behind
            # them are what this module wants, and nothing else offers them here.
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(values, scales.double(), zero_points, 0)
            self.packed = torch.ops.quantized.linear_prepack(
                qweight, bias.detach().float().contiguous() if bias is not None else None)

    @property
    def nbytes(self) -> int:
        """Bytes read per call: the int8 values plus one scale per row (and the bias)."""
        return self.out_features * (self.in_features + 4 + 4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed, REDUCE_RANGE)
        return F.gelu(y, approximate="tanh") if self.gelu else y

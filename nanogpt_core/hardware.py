"""Peak FLOP/s of the device, the denominator of the MFU (model FLOPs utilisation) estimate."""

from __future__ import annotations

import functools
import time

import torch

# Dense bf16 tensor-core peaks from the vendors' data sheets. The first key contained in the
# device name wins, so the PCIe and NVL parts (lower clocks and power) come before the SXM
# parts, whose names carry no suffix ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
CUDA_BF16_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12,
                        "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                        "4090": 165e12, "3090": 71e12}


@functools.lru_cache(maxsize=4)
def peak_flops(device_type: str, device_name: str = "") -> float | None:
    """Peak FLOP/s: from the data-sheet table on CUDA, measured (fp32 matmul) on CPU."""
    if device_type == "cuda":
        name = device_name or torch.cuda.get_device_name()
        return next((peak for key, peak in CUDA_BF16_PEAK_FLOPS.items() if key in name), None)
    if device_type == "cpu":
        return measure_cpu_matmul_flops()
    return None


def measure_cpu_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul rate at the current thread count; about a quarter of a second."""
    # A private generator: measuring must not move the global RNG that training depends on.
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best

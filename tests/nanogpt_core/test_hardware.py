"""The MFU denominator: which data-sheet peak a CUDA device name maps to."""

import pytest

from nanogpt_core.hardware import peak_flops


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
])
def test_each_card_gets_its_own_data_sheet_peak(device_name, peak):
    assert peak_flops("cuda", device_name) == peak


def test_an_unknown_card_has_no_peak_rather_than_a_guess():
    assert peak_flops("cuda", "Imaginary Accelerator 9000") is None

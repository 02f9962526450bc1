"""MFU arithmetic and the peak-FLOPs lookup."""

from __future__ import annotations

import pytest
import torch

from llmctl.train.flops import PEAK_FLOPS, mfu, peak_flops


def test_mfu_arithmetic():
    # 6 * 124M FLOPs per token at 400k tokens/s on one 989 TFLOP/s device
    assert mfu(6 * 124e6, 400e3, 989e12) == pytest.approx(6 * 124e6 * 400e3 / 989e12)
    # two devices share the tokens/s of the whole job
    assert mfu(1e9, 1e5, 1e15, world_size=2) == pytest.approx(0.05)
    assert mfu(1e9, 1e5, None) is None


def test_cpu_peak_only_when_given():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2e12) == 2e12


def test_table_is_most_specific_first():
    names = [name for name, _ in PEAK_FLOPS]
    for i, name in enumerate(names):
        for later in names[i + 1:]:
            # an earlier key inside a later one would catch that GPU's name first
            assert name not in later, f"{name} shadows {later}"
    # lookups the way peak_flops matches them
    lookup = {name: next(v for k, v in PEAK_FLOPS if k in name) for name in
              ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB",
               "NVIDIA L4", "NVIDIA L40S", "NVIDIA GeForce RTX 4090", "NVIDIA H200")}
    assert lookup["NVIDIA H100 80GB HBM3"] == 989e12
    assert lookup["NVIDIA H100 PCIe"] == 756e12
    assert lookup["NVIDIA A100-SXM4-80GB"] == 312e12
    assert lookup["NVIDIA L4"] == 121e12 and lookup["NVIDIA L40S"] == 362e12
    assert lookup["NVIDIA GeForce RTX 4090"] == 165e12

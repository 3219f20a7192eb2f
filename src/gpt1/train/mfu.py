"""Model FLOPs utilization: the peak FLOP/s of known GPUs, which a step's MFU is reported against.

MFU is `model.flops_per_token` (the matmuls that run, see `GPT`) x tokens/s over the device's
peak from `PEAK_FLOPS` (`peak_flops`); none for CPUs and unknown GPUs.
"""

from __future__ import annotations

import re

import torch

# Dense (no sparsity) FP16/BF16 tensor-core peak FLOP/s per GPU, matched against
# torch.cuda.get_device_name() as whole words ("A100" is not in "RTX A1000", nor "T4" in "T400");
# longest match wins. MFU is reported against this peak.
# Sources: NVIDIA datasheets: H100/H200/GH200 SXM 989 TF (H100 PCIe 756, H100 NVL 835), A100 312, L40S 362,
# L40 181, L4 121, A10 125, RTX A6000 155, V100 125, T4 65; Ada and Ampere GeForce
# whitepapers (FP16 with FP32 accumulate): RTX 4090 165, RTX 3090 71.
PEAK_FLOPS = {
    "H200": 989e12, "GH200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H800": 989e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10": 125e12, "A6000": 155e12, "V100": 125e12, "T4": 65e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The peak FLOP/s of a known GPU, None for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_FLOPS if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None

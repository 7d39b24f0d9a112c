"""The precision of the matrix products: fp32, bf16, or auto (bf16 where the hardware has fast
bf16 matrix units, fp32 elsewhere), decided at run time and recorded with the run.

bf16 covers the matrix products and the activations between them (torch.autocast); every
reduction that decides a number people compare (log p(x|z) summed over pixels, the KL, the
log-weights and their log-sum-exp) stays in float32 or wider: autocast runs the losses and
reductions in float32, and the estimators sum in float64.

Fast bf16 matrix units: Intel AMX on the CPU (about 7x the fp32 rate of the same cores, measured
on this project's machines), tensor cores of compute capability 8.0 or later on CUDA. An AMD CPU
without them (also seen here) computes bf16 products no faster than fp32 ones, so `auto` keeps
fp32 there and says so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vae_core.config import PRECISIONS

#: CPU training in bf16 pays from about this batch size: an MLP step at batch 128 is bound by
#: per-step overhead (40k vs 43k images/s fp32 vs bf16 on an AMX Xeon), at 512 it is 1.4x, at
#: 2048 2.2x (issue 23's measurements, 2 cores).
CPU_BF16_MIN_BATCH = 512


@dataclass(frozen=True)
class Precision:
    """What a run computes its matrix products in, and why (auto's decision in words)."""

    name: str  # fp32 | bf16
    reason: str

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast on `device` for a bf16 run; nothing for fp32."""
        if self.name == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX tiles that multiply bf16: the kernel's flags on Linux, else
    torch's own probe (private, so absent in some versions: then no)."""
    flags = _cpu_flags()
    if flags:
        return "amx_bf16" in flags
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` multiplies bf16 matrices much faster than fp32 ones, and what it is."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        has = major >= 8
        what = "bf16 tensor cores" if has else "no bf16 tensor cores"
        return has, f"CUDA compute capability {major}.{minor} ({what})"
    if device.type == "cpu":
        if cpu_has_amx_bf16():
            return True, "CPU with AMX bf16 matrix units"
        return False, "CPU without bf16 matrix units (no AMX)"
    return False, f"{device.type} device (bf16 not used there)"


def resolve_precision(
    requested: str, device: torch.device, batch_size: int | None = None, field: str = "precision"
) -> Precision:
    """fp32 or bf16 for `requested` (fp32 | bf16 | auto) on `device`; for CPU training give
    `batch_size`: auto keeps fp32 below CPU_BF16_MIN_BATCH, where bf16 does not pay."""
    if requested not in PRECISIONS:
        raise ValueError(f"{field}: expected one of {', '.join(PRECISIONS)}, found {requested!r}")
    if requested != "auto":
        return Precision(requested, f"{requested}, as set")
    has, what = fast_bf16(device)
    if has and device.type == "cpu" and batch_size is not None and batch_size < CPU_BF16_MIN_BATCH:
        return Precision(
            "fp32", f"auto: {what}, but batch {batch_size} < {CPU_BF16_MIN_BATCH}, so fp32"
        )
    return Precision("bf16" if has else "fp32", f"auto: {what}, so {'bf16' if has else 'fp32'}")

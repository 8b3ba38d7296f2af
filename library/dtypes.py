"""Names of torch dtypes and devices as command lines write them (``bf16``, ``fp8_e4m3fn``,
``cuda:1`` ...), and the dtype autocast computes in."""

from __future__ import annotations

import contextlib

import torch

from library.errors import UserError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

DTYPE_BY_NAME = {
    "float": torch.float32,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "float8": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "e5m2": torch.float8_e5m2,
    "float8_e5m2": torch.float8_e5m2,
}


def dtype_from_name(name: str, flag: str) -> torch.dtype:
    """The dtype a command-line name stands for; a UserError naming ``flag`` otherwise."""
    key = str(name).strip().lower()
    if key not in DTYPE_BY_NAME:
        raise UserError(f"{flag} {name}: expected one of {', '.join(DTYPE_BY_NAME)}")
    return DTYPE_BY_NAME[key]


def device_from_name(name: str, flag: str) -> torch.device:
    """The device a command-line name stands for, checked to exist here; a UserError naming ``flag`` otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {name}: not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "meta":  # shapes only: the first tensor read from it fails deep inside the work
        raise UserError(f"{flag} {name}: the meta device holds no data; give a device to compute on (cpu, cuda)")
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise UserError(f"{flag} {name}: this machine (or its torch build) has no {device.type} device")
    if device.index is not None and device.index >= backend.device_count():
        raise UserError(f"{flag} {name}: there are only {backend.device_count()} {device.type} devices")
    return device


def preferred_device() -> str:
    """The device a script runs on when none is named: CUDA, else Intel's XPU, else Apple's MPS, else the CPU."""
    for name, backend in (("cuda", torch.cuda), ("xpu", getattr(torch, "xpu", None)),
                          ("mps", getattr(torch.backends, "mps", None))):  # fmt: skip
        if backend is not None and backend.is_available():
            return name
    return "cpu"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device type; None while it is off, or where the
    device has no autocast (the meta device of shape inference)."""
    if _has_autocast(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast turned off for this device type (nothing to do where it has none)."""
    if _has_autocast(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _has_autocast(device_type: str) -> bool:
    # Every device type torch.compile traces has autocast. Not asking there keeps a compiled block in
    # one graph: dynamo before torch 2.13 cannot trace torch._C._is_autocast_available, and breaks
    # the graph at each call (ten graphs for a double block with torch 2.11).
    return torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)


def allow_fp16_gradients(scaler) -> None:
    """Lets a GradScaler unscale fp16 gradients (``--full_fp16``: the LoRA itself is fp16). torch
    refuses them by default; unscaling only multiplies by 1/scale, and a result that overflows is
    caught as inf like any other. sd-scripts patches accelerate's scaler the same way."""
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16

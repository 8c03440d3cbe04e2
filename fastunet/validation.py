"""Input checks for ``UNet.forward`` and ``UNetReference.forward``: every mistake a user can
make with the input tensor gets an error that names the problem and the expected value, before
any kernel or ``torch.cat`` sees it."""

from __future__ import annotations

import torch

#: What a model does with H, W that are not multiples of ``2**depth`` (its ``odd_sizes`` option).
ODD_SIZES = ("error", "pad")


def nearest_multiple(n: int, m: int) -> int:
    """The multiple of ``m`` closest to ``n`` (ties round up), never below ``m``."""
    return max(m, ((n + m // 2) // m) * m)


def validate_input(
    x: object,
    *,
    in_ch: int,
    depth: int,
    param_dtype: torch.dtype,
    param_device: torch.device,
    odd_sizes: str = "error",
) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``x`` is a valid U-Net input.

    Valid: a floating-point ``[N, in_ch, H, W]`` tensor on the model's device, in the model's
    dtype unless autocast is on for that device, with H and W multiples of ``2**depth`` for
    ``odd_sizes="error"`` (the classic model), or at least ``2**depth`` for ``odd_sizes="pad"``
    (every pooling must leave a pixel).
    """
    if odd_sizes not in ODD_SIZES:
        raise ValueError(f"odd_sizes must be one of {ODD_SIZES}, got {odd_sizes!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"UNet expects a torch.Tensor of shape [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (for one image use x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(
            f"UNet expects a 4-D input [N, C, H, W], got a {x.dim()}-D tensor of shape {tuple(x.shape)}{hint}"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"UNet expects a floating-point input (float32, float16, bfloat16 or float64), got {x.dtype}; "
            f"{_conversion_advice(x.dtype)}"
        )
    n, c, h, w = x.shape
    if c != in_ch:
        raise ValueError(f"UNet was built for {in_ch} input channels, got an input with {c} (shape {tuple(x.shape)})")
    if h < 1 or w < 1:
        raise ValueError(f"UNet needs an image of at least one pixel, got H={h}, W={w} (shape {tuple(x.shape)})")
    m = 2**depth
    if odd_sizes == "pad":
        if h < m or w < m:
            raise ValueError(
                f"UNet with depth {depth} needs H and W of at least {m} (each of its {depth} poolings halves "
                f"them), got H={h}, W={w}; the smallest valid size is H={max(h, m)}, W={max(w, m)} (pad or resize "
                "the input)"
            )
    elif h % m or w % m:
        raise ValueError(
            f"UNet with depth {depth} needs H and W divisible by {m}, got H={h}, W={w}; "
            f"the nearest valid size is H={nearest_multiple(h, m)}, W={nearest_multiple(w, m)} "
            "(pad or resize the input)"
        )
    if x.device != param_device:
        raise ValueError(f"input is on {x.device} but the model's parameters are on {param_device}; move one of them")
    autocast = x.dtype != torch.float64 and _autocast_enabled(x.device.type)
    if x.dtype != param_dtype and not autocast:
        raise TypeError(dtype_mismatch_message(x.dtype, param_dtype, x.device))


def _conversion_advice(dtype: torch.dtype) -> str:
    """How to turn an input of a non-float ``dtype`` into what the model takes: scaled by the
    dtype's range where it has a conventional one (fastunet.predict does the same)."""
    if dtype == torch.bool:
        return "convert it first: x.float()"
    if dtype.is_complex:
        return "a U-Net takes real images: pass x.real or x.abs(), as a float tensor"
    info = torch.iinfo(dtype)
    if info.bits <= 16:
        return f"convert it first, scaled by its range: x.float() / {info.max} (what fastunet.predict does)"
    return (
        f"convert it first, scaled as the model was trained: {str(dtype).removeprefix('torch.')} has no conventional "
        "range (e.g. x.float() / 4095 for 12-bit data)"
    )


def _autocast_enabled(device_type: str) -> bool:
    # Autocast exists for a few device types only; asking about another one (the meta device,
    # used for shape and FLOP counting) raises instead of answering no.
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def dtype_mismatch_message(x_dtype: torch.dtype, param_dtype: torch.dtype, device: torch.device) -> str:
    """The advice for an input whose dtype differs from the model's parameters.

    On CPU it never suggests converting the model to float16 (float16 convolutions run far
    slower than float32 on most CPUs): it suggests converting the input, and for reduced
    precision bfloat16 autocast, which keeps the float32 weights and runs the convolutions in
    bfloat16 (autocast leaves float64 inputs alone, so not for those).
    """
    head = f"input dtype {x_dtype} does not match the model's parameters ({param_dtype}); "
    if device.type != "cpu":
        return head + f"convert the model (model.to({x_dtype})) or the input, or run under torch.autocast"
    advice = f"convert the input to the model's dtype (x.to({param_dtype}))"
    if x_dtype != torch.float64:
        advice += (
            ', or for reduced precision on CPU run a float32 model under torch.autocast("cpu", '
            "dtype=torch.bfloat16) rather than converting the model to float16 (float16 convolutions are much "
            "slower than float32 on most CPUs)"
        )
    return head + advice

"""1x1 head kernel vs ``F.conv2d`` + activation in float64, on NaN-poisoned outputs.

With ``in_scale``/``in_shift`` the kernel reads ``T(x) = relu(x*scale + shift)``; the reference
applies the head to a materialized ``T(x)`` (fp32 math, rounded to x's dtype).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, poisoned_like, tolerance_name

# The submodule (``fastunet.kernels.head1x1`` as an attribute is the launcher the package exports).
kernel_module = importlib.import_module("fastunet.kernels.head1x1")
MAX_CLASSES = kernel_module.MAX_CLASSES
compile_specs = kernel_module.compile_specs
head1x1 = kernel_module.head1x1

pytestmark = pytest.mark.head

# Kernels run compiled, not interpreted: on a GPU, and under the simulated GPU that
# benchmarks/gpu_plan.py records ring 3's launches with (it must parametrize as a GPU does).
ON_GPU = not importlib.import_module("fastunet.kernels._common").interpreting()
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not ON_GPU, reason="the Triton interpreter's bf16 tl.dot is broken; CUDA only"),
    ),
]
ACTIVATIONS = ["none", "sigmoid", "softmax"]


def make_input(shape, dtype, device, layout):
    """``shape`` (NCHW) in ``layout``: "nhwc", "nchw", or "slice" (channels 2.. of a wider
    channels_last buffer, so channel stride 1 but pixel strides larger than C)."""
    n, c, h, w = shape
    if layout == "slice":
        buf = torch.randn(n, c + 5, h, w, device=device).to(dtype, memory_format=torch.channels_last)
        return buf[:, 2 : 2 + c]
    x = torch.randn(shape, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


def make_output(shape, dtype, device, layout):
    """A NaN-filled destination and the buffer that holds it (wider for "slice")."""
    n, c, h, w = shape
    if layout == "slice":
        buf = torch.full((n, c + 4, h, w), float("nan"), device=device, dtype=dtype)
        buf = buf.contiguous(memory_format=torch.channels_last)
        return buf[:, 1 : 1 + c], buf
    out = poisoned_like(torch.empty(shape, device=device, dtype=dtype))
    return out, out


def reference(x, weight, bias, activation):
    k, c = weight.shape[:2]
    b = None if bias is None else bias.double()
    y = F.conv2d(x.double(), weight.double().reshape(k, c, 1, 1), b)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "softmax":
        return torch.softmax(y, dim=1)
    return y


def make_norm(c, device):
    """fp32 ``(scale, shift)`` with scales of both signs, so the ReLU zeroes different pixels
    per channel, and shifts that keep a good share of each channel alive."""
    sign = torch.where(torch.arange(c, device=device) % 2 == 0, 1.0, -1.0)
    scale = (torch.rand(c, device=device) + 0.25) * sign
    shift = torch.randn(c, device=device) * 0.5
    return scale, shift


def materialized_norm(x, scale, shift):
    """``T(x)`` as a separate BatchNorm+ReLU in x's dtype would store it."""
    return torch.relu(x.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def run_case(
    shape,
    k,
    activation,
    dtype,
    device,
    *,
    in_layout="nhwc",
    out_layout="nhwc",
    weight_2d=False,
    has_bias=True,
    norm=False,
):
    n, c, h, w = shape
    x = make_input(shape, dtype, device, in_layout)
    weight = torch.randn(k, c, 1, 1, device=device).mul_(c**-0.5).to(dtype)
    if weight_2d:
        weight = weight.reshape(k, c)
    bias = torch.randn(k, device=device) if has_bias else None
    out, buf = make_output((n, k, h, w), dtype, device, out_layout)
    kwargs = {}
    xin = x  # what the head should see
    if norm:
        kwargs["in_scale"], kwargs["in_shift"] = make_norm(c, device)
        xin = materialized_norm(x, kwargs["in_scale"], kwargs["in_shift"])
    got = head1x1(x, weight, bias, activation=activation, **kwargs, out=out)
    assert got is out
    what = f"head1x1 {tuple(shape)}->{k} {activation} {dtype} in={in_layout} out={out_layout} norm={norm}"
    assert_close(got, reference(xin, weight, bias, activation), tolerance_name(dtype), what)
    if out_layout == "slice":
        assert torch.isnan(buf[:, :1]).all() and torch.isnan(buf[:, 1 + k :]).all(), "wrote outside its channel slice"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(
    "shape", [(1, 3, 5, 7), (3, 37, 9, 9), (1, 64, 4, 6)], ids=["b1-c3-5x7", "b3-c37-9x9", "b1-c64"]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(shape, k, activation, dtype, device):
    run_case(shape, k, activation, dtype, device)


@pytest.mark.parametrize("out_layout", ["nhwc", "slice"])
@pytest.mark.parametrize("in_layout", ["nhwc", "nchw", "slice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(in_layout, out_layout, dtype, device):
    run_case((3, 37, 5, 7), 3, "softmax", dtype, device, in_layout=in_layout, out_layout=out_layout)


@pytest.mark.parametrize("activation", ["none", "softmax"])
@pytest.mark.parametrize(
    "shape, k", [((1, 3, 5, 7), 2), ((2, 17, 2, 3), 5), ((1, 37, 4, 6), 3)], ids=["b1-c3", "b2-c17", "b1-c37"]
)
@pytest.mark.parametrize("in_layout", ["nhwc", "nchw", "slice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_matches_torch(shape, k, activation, in_layout, dtype, device):
    # C = 37 leaves a partial channel tile: its padded lanes must stay 0 through the transform.
    out_layout = "slice" if in_layout == "slice" else "nhwc"
    run_case(shape, k, activation, dtype, device, in_layout=in_layout, out_layout=out_layout, norm=True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_weight_2d_no_bias(activation, device):
    run_case((1, 37, 5, 7), 3, activation, torch.float32, device, weight_2d=True, has_bias=False)


@pytest.mark.parametrize("k", [17, MAX_CLASSES], ids=["k17", "kmax"])
def test_many_classes_softmax(k, device):
    run_case((1, 37, 3, 5), k, "softmax", torch.float16, device)


def _all_gpu_tiles():
    tiles = {tuple(sorted(c.kwargs.items())) for cs in kernel_module._CONFIGS.values() for c in cs}
    return [dict(t) for t in sorted(tiles)]


@pytest.mark.skipif(ON_GPU, reason="compiled, every config is forced once by tests/test_tuned_configs.py")
@pytest.mark.parametrize("k", [3, 40])
@pytest.mark.parametrize("tile", _all_gpu_tiles(), ids=lambda t: "-".join(map(str, t.values())))
def test_every_gpu_tile_in_interpreter(tile, k, device, monkeypatch):
    # The interpreter normally runs one small tile; run each GPU tile size once as well
    # (partial pixel and channel tiles, padded classes).
    monkeypatch.setattr(kernel_module, "_INTERPRETER_CONFIG", tile)
    run_case((3, 70, 7, 9), k, "softmax", torch.float16, device)


def test_default_output_is_channels_last(device):
    x = torch.randn(1, 3, 5, 7, device=device)
    out = head1x1(x, torch.randn(2, 3, device=device), None, activation="none")
    assert out.shape == (1, 2, 5, 7) and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"x": torch.randn(2, 3, 4)}, ValueError),
        ({"x": torch.randn(1, 3, 4, 4, dtype=torch.float64)}, TypeError),
        ({"weight": torch.randn(2, 4)}, ValueError),
        ({"weight": torch.randn(2, 3, 3, 3)}, ValueError),
        ({"weight": torch.randn(MAX_CLASSES + 1, 3), "bias": None}, ValueError),
        ({"weight": torch.randn(2, 3, dtype=torch.float16)}, TypeError),
        ({"bias": torch.randn(3)}, ValueError),
        ({"activation": "relu"}, ValueError),
        ({"out": torch.empty(1, 3, 4, 4)}, ValueError),
        ({"out": torch.empty(1, 2, 4, 4, dtype=torch.float16)}, TypeError),
    ],
    ids=["x-3d", "x-fp64", "w-c", "w-3x3", "k-too-big", "w-dtype", "bias-shape", "act", "out-shape", "out-dtype"],
)
def test_rejects_bad_arguments(change, error, device):
    args = {
        "x": torch.randn(1, 3, 4, 4),
        "weight": torch.randn(2, 3, 1, 1),
        "bias": torch.randn(2),
        "activation": "sigmoid",
        "out": None,
    }
    args.update(change)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error):
        head1x1(args["x"], args["weight"], args["bias"], activation=args["activation"], out=args["out"])


@pytest.mark.parametrize(
    "in_scale, in_shift, error",
    [
        (torch.ones(3), None, ValueError),
        (None, torch.ones(3), ValueError),
        (torch.ones(2), torch.ones(2), ValueError),  # K, not C
        (torch.ones(3, dtype=torch.bfloat16), torch.ones(3), TypeError),
        (torch.ones(3), torch.ones(3, dtype=torch.int32), TypeError),  # fp32 and fp64 are both read
    ],
    ids=["scale-only", "shift-only", "k", "scale-bf16", "shift-int"],
)
def test_rejects_bad_norm(in_scale, in_shift, error, device):
    x, weight = torch.randn(1, 3, 4, 4, device=device), torch.randn(2, 3, device=device)
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    with pytest.raises(error):
        head1x1(x, weight, None, activation="softmax", in_scale=move(in_scale), in_shift=move(in_shift))


def test_compile_specs_cover_every_dtype():
    for arch in (80, 90):
        specs = compile_specs(arch)
        assert {s.dtype for s in specs} == {"fp32", "fp16", "bf16"}
        for block_k in (16, 32, 64):  # every K the launcher accepts has a usable config
            assert {s.dtype for s in specs if s.constexprs["BLOCK_K"] == block_k} == {"fp32", "fp16", "bf16"}
        assert {(s.dtype, s.constexprs["IN_NORM"]) for s in specs} == {
            (d, n) for d in ("fp32", "fp16", "bf16") for n in (False, True)
        }
        for s in specs:
            assert set(s.signature) == set(s.fn.arg_names)
            assert all(s.signature[k] == "constexpr" for k in s.constexprs)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unet_sizes_cuda(k, activation, dtype):
    # The U-Net head: 64 channels at full resolution, batch 4.
    run_case((4, 64, 256, 256), k, activation, dtype, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unet_sizes_norm_cuda(activation, dtype):
    run_case((4, 64, 256, 256), 3, activation, dtype, torch.device("cuda"), norm=True)

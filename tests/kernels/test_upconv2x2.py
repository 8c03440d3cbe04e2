"""ConvTranspose2d(2, stride 2) kernel vs ``F.conv_transpose2d`` in float64.

Every case writes into a NaN-poisoned output, so an element the kernel skips fails the
comparison; channel-slice outputs also check that the neighbouring channels stay NaN.

With ``in_scale``/``in_shift`` the kernel upsamples ``T(x) = relu(x*scale + shift)``; the
reference upsamples a materialized ``T(x)`` (fp32 math, rounded to x's dtype).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, poisoned_like, tolerance_name

# The submodule (``fastunet.kernels.upconv2x2`` as an attribute is the launcher the package exports).
kernel_module = importlib.import_module("fastunet.kernels.upconv2x2")
compile_specs = kernel_module.compile_specs
pack_upconv2x2_weight = kernel_module.pack_upconv2x2_weight
upconv2x2 = kernel_module.upconv2x2

pytestmark = pytest.mark.upconv

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


def reference(x, weight, bias):
    b = None if bias is None else bias.double()
    return F.conv_transpose2d(x.double(), weight.double(), b, stride=2)


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
    c_out,
    dtype,
    device,
    *,
    in_layout="nhwc",
    out_layout="nhwc",
    packed=True,
    bias_dtype=torch.float32,
    norm=False,
):
    n, c_in, h, w = shape
    x = make_input(shape, dtype, device, in_layout)
    weight = torch.randn(c_in, c_out, 2, 2, device=device).mul_(c_in**-0.5).to(dtype)
    bias = None if bias_dtype is None else torch.randn(c_out, device=device).to(bias_dtype)
    out, buf = make_output((n, c_out, 2 * h, 2 * w), dtype, device, out_layout)
    kwargs = {}
    xin = x  # what the kernel should upsample
    if norm:
        kwargs["in_scale"], kwargs["in_shift"] = make_norm(c_in, device)
        xin = materialized_norm(x, kwargs["in_scale"], kwargs["in_shift"])
    got = upconv2x2(x, pack_upconv2x2_weight(weight) if packed else weight, bias, **kwargs, out=out)
    assert got is out
    what = f"upconv2x2 {tuple(shape)}->{c_out} {dtype} in={in_layout} out={out_layout} norm={norm}"
    assert_close(got, reference(xin, weight, bias), tolerance_name(dtype), what)
    if out_layout == "slice":
        assert torch.isnan(buf[:, :1]).all() and torch.isnan(buf[:, 1 + c_out :]).all(), (
            "wrote outside its channel slice"
        )


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize(
    "shape, c_out",
    [((1, 3, 5, 7), 37), ((3, 37, 9, 9), 3), ((3, 37, 5, 7), 37), ((1, 64, 4, 6), 32)],
    ids=["b1-c3-5x7", "b3-c37-9x9", "b3-c37to37", "b1-c64-4x6"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(shape, c_out, dtype, packed, device):
    run_case(shape, c_out, dtype, device, packed=packed)


@pytest.mark.parametrize("out_layout", ["nhwc", "slice"])
@pytest.mark.parametrize("in_layout", ["nhwc", "nchw", "slice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(in_layout, out_layout, dtype, device):
    run_case((3, 37, 5, 7), 19, dtype, device, in_layout=in_layout, out_layout=out_layout)


@pytest.mark.parametrize(
    "shape, c_out",
    [((1, 3, 5, 7), 5), ((2, 17, 2, 3), 3), ((1, 37, 4, 6), 17)],
    ids=["b1-c3-5x7", "b2-c17-2x3", "b1-c37-4x6"],
)
@pytest.mark.parametrize("in_layout", ["nhwc", "nchw", "slice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_matches_torch(shape, c_out, in_layout, dtype, device):
    # C_in = 37 leaves a partial K tile: its padded lanes must stay 0 through the transform.
    out_layout = "slice" if in_layout == "slice" else "nhwc"
    run_case(shape, c_out, dtype, device, in_layout=in_layout, out_layout=out_layout, norm=True)


@pytest.mark.skipif(ON_GPU, reason="compiled, every config is forced once by tests/test_tuned_configs.py")
def test_norm_block_k_wider_than_c_in(device, monkeypatch):
    # One K tile, mostly padding: the padded lanes must add nothing once the transform ran.
    monkeypatch.setattr(kernel_module, "_INTERPRETER_CONFIG", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})
    run_case((1, 5, 3, 5), 7, torch.float32, device, bias_dtype=None, norm=True)


@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.float32], ids=str)
def test_bias(bias_dtype, device):
    run_case((1, 37, 5, 7), 3, torch.float16, device, bias_dtype=bias_dtype)


def _all_gpu_tiles():
    lists = [*kernel_module._CONFIGS.values(), *kernel_module._IEEE_CONFIGS.values()]
    tiles = {tuple(sorted(c.kwargs.items())) for configs in lists for c in configs}
    return [dict(t) for t in sorted(tiles)]


@pytest.mark.skipif(ON_GPU, reason="compiled, every config is forced once by tests/test_tuned_configs.py")
@pytest.mark.parametrize("tile", _all_gpu_tiles(), ids=lambda t: "-".join(map(str, t.values())))
def test_every_gpu_tile_in_interpreter(tile, device, monkeypatch):
    # The interpreter normally runs one small tile; run each GPU tile size once so masking
    # (partial M, K and N tiles, BLOCK_N > C_out) is checked for every shape a GPU may use.
    monkeypatch.setattr(kernel_module, "_INTERPRETER_CONFIG", tile)
    run_case((3, 70, 7, 9), 70, torch.float16, device)


def test_default_output_is_channels_last(device):
    x = make_input((1, 3, 5, 7), torch.float32, device, "nhwc")
    out = upconv2x2(x, torch.randn(3, 4, 2, 2, device=device), None)
    assert out.shape == (1, 4, 10, 14) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_pack_weight():
    weight = torch.randn(5, 7, 2, 2, requires_grad=True)
    packed = pack_upconv2x2_weight(weight)
    assert packed.shape == weight.shape and torch.equal(packed, weight)
    assert packed.permute(0, 2, 3, 1).is_contiguous()  # storage [C_in, 2, 2, C_out]
    packed.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))


@pytest.mark.parametrize(
    "change, error",
    [
        ({"x": torch.randn(2, 3, 4)}, ValueError),
        ({"x": torch.randn(1, 3, 4, 4, dtype=torch.float64)}, TypeError),
        ({"weight": torch.randn(4, 5, 2, 2)}, ValueError),
        ({"weight": torch.randn(3, 5, 3, 3)}, ValueError),
        ({"weight": torch.randn(3, 5, 2, 2, dtype=torch.float16)}, TypeError),
        ({"bias": torch.randn(4)}, ValueError),
        ({"bias": torch.ones(5, dtype=torch.int32)}, TypeError),
        ({"out": torch.empty(1, 5, 4, 4)}, ValueError),
        ({"out": torch.empty(1, 5, 8, 8, dtype=torch.float16)}, TypeError),
    ],
    ids=["x-3d", "x-fp64", "w-cin", "w-3x3", "w-dtype", "bias-shape", "bias-int", "out-shape", "out-dtype"],
)
def test_rejects_bad_arguments(change, error, device):
    args = {"x": torch.randn(1, 3, 4, 4), "weight": torch.randn(3, 5, 2, 2), "bias": torch.randn(5), "out": None}
    args.update(change)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error):
        upconv2x2(args["x"], args["weight"], args["bias"], out=args["out"])


@pytest.mark.parametrize(
    "in_scale, in_shift, error",
    [
        (torch.ones(3), None, ValueError),
        (None, torch.ones(3), ValueError),
        (torch.ones(5), torch.ones(5), ValueError),  # C_out, not C_in
        (torch.ones(3, dtype=torch.float16), torch.ones(3), TypeError),
        (torch.ones(3), torch.ones(3, dtype=torch.int32), TypeError),  # fp32 and fp64 are both read
    ],
    ids=["scale-only", "shift-only", "c-out", "scale-fp16", "shift-int"],
)
def test_rejects_bad_norm(in_scale, in_shift, error, device):
    x, weight = torch.randn(1, 3, 4, 4, device=device), torch.randn(3, 5, 2, 2, device=device)
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    with pytest.raises(error):
        upconv2x2(x, weight, None, in_scale=move(in_scale), in_shift=move(in_shift))


def test_compile_specs_cover_every_dtype():
    for arch in (80, 90):
        specs = compile_specs(arch)
        assert {s.dtype for s in specs} == {"fp32", "fp16", "bf16"}
        assert {(s.dtype, s.constexprs["IN_NORM"]) for s in specs} == {
            (d, n) for d in ("fp32", "fp16", "bf16") for n in (False, True)
        }
        for s in specs:
            assert set(s.signature) == set(s.fn.arg_names)
            assert all(s.signature[k] == "constexpr" for k in s.constexprs)


# The U-Net's four upsampling steps (C_in -> C_out at h x w) at batch 2, real sizes.
UNET_UPCONVS = [(1024, 512, 16, 16), (512, 256, 32, 32), (256, 128, 64, 64), (128, 64, 128, 128)]


@pytest.mark.cuda
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("c_in, c_out, h, w", UNET_UPCONVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unet_sizes_cuda(c_in, c_out, h, w, dtype, norm):
    run_case((2, c_in, h, w), c_out, dtype, torch.device("cuda"), norm=norm)

"""``fastunet.predict``: whole-image inference at any size, by tiles placed and weighted as
MONAI places and weights them, the overlap-tile ("center") blend, test-time flips, numpy and
memmap inputs and outputs, the memory-bounded host path, and every refused argument.

Models: a tiny ``UNet(3, 1, base_channels=4, depth=2)`` (any pooling phase matters to it), a
pointwise model (receptive field 0: any correct tiling reproduces the whole-image output
exactly) and a two-conv model (receptive field 2 px: tiles agree with the whole image wherever
every tile covering a pixel sees its whole receptive field). All on CPU, small images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_live, randomize_batchnorm
from torch import nn

import fastunet
from fastunet.predict import importance_map, tile_starts


class Pointwise(nn.Module):
    """1x1 convs only: output pixel = f(input pixel). Has a U-Net's input contract."""

    depth, in_ch, out_ch = 2, 3, 2

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return torch.sigmoid(self.b(torch.tanh(self.a(x))))


class TwoConv(nn.Module):
    """Two 3x3 convs with zero padding: receptive field 2 px each side, translation-equivariant."""

    depth, in_ch, out_ch = 2, 3, 1
    rf = 2

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 1, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions: one intra-op thread is faster, and on a busy 2-core machine OpenMP's
    barriers waiting on a descheduled thread made these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(1)
    model = fastunet.UNet(3, 1, base_channels=4, depth=2)
    _calibrate(model)
    return model.eval()


def _calibrate(model):
    """Non-trivial BatchNorm statistics (eval mode differs from train mode) and a live network:
    O(1) activations at every layer and an output that depends on the input, so comparing two
    predictions checks something."""
    randomize_batchnorm(model, torch.rand(2, model.in_ch, 32, 32))
    assert_live(model, model.in_ch, 32)
    return model.eval()


def _reference_tiled(model, x, tile, overlap, blend, pad_mode="reflect"):
    """MONAI's sliding-window formulas written out plainly, one window at a time, as the
    oracle: pad to the tile (half before), starts every int(t * (1 - overlap)) with the last
    flush, Gaussian sigma 0.125 * t floored at max(min, 1e-3), sum(w * y) / sum(w)."""
    _, _, h, w = x.shape
    th, tw = tile
    ph, pw = max(h, th), max(w, tw)
    top, left = (ph - h) // 2, (pw - w) // 2
    xp = F.pad(x, (left, pw - w - left, top, ph - h - top), mode=pad_mode)

    def starts(length, t):
        step = t if length == t else max(1, int(t * (1 - overlap)))
        out = [0]
        while out[-1] + t < length:
            out.append(min(out[-1] + step, length - t))
        return out

    if blend == "gaussian":
        g = [torch.exp(-((torch.arange(n) - (n - 1) / 2) ** 2) / (2 * (0.125 * n) ** 2)) for n in (th, tw)]
        wmap = g[0][:, None] * g[1][None, :]
        wmap = wmap.clamp(min=max(wmap.min().item(), 1e-3))
    else:
        wmap = torch.ones(th, tw)
    num = den = None
    with torch.no_grad():
        for sy in starts(ph, th):
            for sx in starts(pw, tw):
                y = model(xp[:, :, sy : sy + th, sx : sx + tw])
                if num is None:
                    num = torch.zeros(x.shape[0], y.shape[1], ph, pw)
                    den = torch.zeros(ph, pw)
                num[:, :, sy : sy + th, sx : sx + tw] += y * wmap
                den[sy : sy + th, sx : sx + tw] += wmap
    return (num / den)[:, :, top : top + h, left : left + w]


def _whole(model, x, multiple, pad_mode="reflect"):
    """The model on the image padded (numpy's reflect: it handles pads wider than the image)
    to the next multiple, half before and half after, cropped back."""
    _, _, h, w = x.shape
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    top, left = (ph - h) // 2, (pw - w) // 2
    mode = {"reflect": "reflect", "replicate": "edge", "constant": "constant"}[pad_mode]
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (top, ph - h - top), (left, pw - w - left)), mode=mode)
    with torch.no_grad():
        return model(torch.from_numpy(xp))[:, :, top : top + h, left : left + w]


# --------------------------------------------------------------------------- geometry
def test_tile_starts_follow_monai_placement():
    assert tile_starts(128, 128, 0.25) == [0]
    assert tile_starts(512, 128, 0.25) == [0, 96, 192, 288, 384]
    assert tile_starts(150, 32, 0.25) == [0, 24, 48, 72, 96, 118]  # the last flush with the end
    assert tile_starts(64, 32, 0.0) == [0, 32]
    assert tile_starts(40, 32, 0.99) == list(range(9))  # interval int(0.32) -> 1


def test_gaussian_importance_map_is_monai_s():
    w = importance_map((32, 16), "gaussian")
    assert w.shape == (32, 16)
    assert w.max().item() < 1 and w[15, 7] == w.max()  # even sizes: the 4 centre pixels share the peak
    assert w.min().item() == pytest.approx(1e-3)  # the corners are floored at 1e-3
    sigma = 0.125 * 32
    assert (w[4, 7] / w[15, 7]).item() == pytest.approx(np.exp(-(11.5**2 - 0.5**2) / (2 * sigma**2)), rel=1e-9)
    assert torch.equal(importance_map((8, 8), "constant"), torch.ones(8, 8, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (150, 123), (1000, 37)])
def test_any_size_whole_image_is_padded_and_cropped(unet, shape):
    x = torch.rand(1, 3, *shape)
    y = fastunet.predict(unet, x)
    assert y.shape == (1, 1, *shape) and y.dtype == torch.float32
    torch.testing.assert_close(y, _whole(unet, x, 4), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pad_mode", ["reflect", "replicate", "constant"])
def test_pad_modes_match_numpy_pad_also_wider_than_the_image(unet, pad_mode):
    x = torch.rand(1, 3, 3, 1)  # pads of 0 and 1 at the top, 1 and 2 at the sides: wider than W
    torch.testing.assert_close(
        fastunet.predict(unet, x, pad_mode=pad_mode), _whole(unet, x, 4, pad_mode), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize(
    "shape, tile, overlap, blend",
    [
        ((150, 123), (32, 32), 0.0, "gaussian"),
        ((150, 123), (32, 32), 0.25, "gaussian"),
        ((150, 123), (32, 32), 0.5, "constant"),
        ((17, 33), (32, 32), 0.25, "gaussian"),  # tile larger than the image: padded to it
        ((40, 70), (16, 32), 0.5, "gaussian"),  # non-square tiles
        ((40, 70), (16, 32), 0.0, "constant"),
    ],
)
def test_tiles_equal_the_sliding_window_formulas(unet, blend, overlap, shape, tile):
    """Against the oracle above, on the real U-Net (where a misplaced tile shows): tiles smaller
    than the image, larger than it (padded to the tile), non-square; two images per batch."""
    x = torch.rand(2, 3, *shape)
    y = fastunet.predict(unet, x, tile_size=tile, overlap=overlap, blend=blend, batch_size=3)
    torch.testing.assert_close(y, _reference_tiled(unet, x, tile, overlap, blend), atol=2e-6, rtol=1e-5)


def test_monai_gives_the_same_result_when_installed(unet):
    monai = pytest.importorskip("monai.inferers", reason="MONAI not installed (optional)")
    x = torch.rand(2, 3, 150, 123)
    for blend, overlap in (("gaussian", 0.25), ("gaussian", 0.5), ("constant", 0.0)):
        with torch.no_grad():
            ref = monai.sliding_window_inference(
                x, (32, 32), 4, unet, overlap=overlap, mode=blend, sigma_scale=0.125, padding_mode="reflect"
            )
        y = fastunet.predict(unet, x, tile_size=32, overlap=overlap, blend=blend, batch_size=4)
        assert (y - ref).abs().max().item() < 1e-6, (blend, overlap)
    small = torch.rand(1, 3, 20, 150)  # shorter than the tile in H: padded half before, half after
    with torch.no_grad():
        ref = monai.sliding_window_inference(small, 32, 2, unet, overlap=0.25, mode="gaussian", padding_mode="reflect")
    assert (fastunet.predict(unet, small, tile_size=32) - ref).abs().max().item() < 1e-6


# --------------------------------------------------------------------------- blends
@pytest.mark.parametrize("blend", ["gaussian", "constant", "center"])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_pointwise_model_tiled_equals_whole_image(blend, overlap):
    model = Pointwise().eval()
    x = torch.rand(1, 3, 150, 123)
    whole = fastunet.predict(model, x)
    tiled = fastunet.predict(model, x, tile_size=(32, 16), overlap=overlap, blend=blend)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=1e-6)


def _full_view(length, tile, overlap, rf):
    """Pixels (1-D) that every covering window sees with its whole receptive field, away from
    the image border (where the whole-image path's padding differs from the tiles' borders)."""
    good = np.zeros(length, bool)
    good[rf : length - rf] = True
    for s in tile_starts(length, tile, overlap):
        for p in range(s, s + tile):
            if (p - s < rf and s > 0) or (s + tile - 1 - p < rf and s + tile < length):
                good[p] = False
    return torch.from_numpy(good)


@pytest.mark.parametrize("blend", ["gaussian", "constant", "center"])
def test_tiles_equal_whole_image_where_each_tile_sees_the_receptive_field(blend):
    model = TwoConv().eval()
    x = torch.rand(1, 3, 150, 123)
    whole = fastunet.predict(model, x)
    tiled = fastunet.predict(model, x, tile_size=32, overlap=0.5, blend=blend)
    good = _full_view(150, 32, 0.5, model.rf)[:, None] & _full_view(123, 32, 0.5, model.rf)[None, :]
    assert good.float().mean() > 0.5
    torch.testing.assert_close(tiled[0, 0][good], whole[0, 0][good], atol=1e-6, rtol=1e-6)
    if blend != "center":  # averaging in a tile's border pixels: not the whole-image values there
        assert not torch.allclose(tiled[0, 0][~good], whole[0, 0][~good], atol=1e-4)


def test_center_blend_is_the_whole_image_in_the_interior_with_overlap_over_twice_the_field():
    """The paper's overlap-tile: each pixel from the tile it is most central in, so with an
    overlap of more than twice the receptive field every interior pixel is exact."""
    model = TwoConv().eval()
    x = torch.rand(1, 3, 150, 123)
    whole = fastunet.predict(model, x)
    tiled = fastunet.predict(model, x, tile_size=32, overlap=0.25, blend="center")  # 8 px overlap > 2 x 2
    r = model.rf
    torch.testing.assert_close(tiled[..., r:-r, r:-r], whole[..., r:-r, r:-r], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- test-time flips
def _dihedral_symmetric(model):
    """Make every kernel invariant under the 8 flips/transposes of the square: the model then
    commutes with them (max-pool and the 2x2 up-conv on even sizes too)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.kernel_size[0] > 1:
                w = m.weight
                views = [w, w.flip(-1), w.flip(-2), w.flip(-1, -2)]
                views += [v.transpose(-1, -2) for v in views]
                w.copy_(sum(views) / 8)
    return model


@pytest.mark.parametrize("tta", ["flips", "flips8"])
@pytest.mark.parametrize("tile", [None, 32, (32, 16)])
def test_tta_on_a_flip_equivariant_unet_gives_the_plain_result(tta, tile):
    torch.manual_seed(2)
    model = _dihedral_symmetric(fastunet.UNet(3, 1, base_channels=4, depth=2))
    _calibrate(model)
    x = torch.rand(1, 3, 60, 44)
    plain = fastunet.predict(model, x, tile_size=tile)
    torch.testing.assert_close(fastunet.predict(model, x, tile_size=tile, tta=tta), plain, atol=1e-5, rtol=1e-5)


def test_tta_averages_the_unflipped_variants(unet):
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        flips = [(), (3,), (2,), (2, 3)]
        expected = sum(unet(x.flip(d)).flip(d) if d else unet(x) for d in flips) / 4
        t = x.transpose(2, 3)
        expected8 = (
            4 * expected + sum(unet(t.flip(d)).flip(d).transpose(2, 3) if d else unet(t).transpose(2, 3) for d in flips)
        ) / 8
    torch.testing.assert_close(fastunet.predict(unet, x, tta="flips"), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fastunet.predict(unet, x, tta="flips8"), expected8, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected, fastunet.predict(unet, x), atol=1e-4)  # it did something


def test_tta_runs_all_variants_of_a_batch_in_one_forward(unet):
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        fastunet.predict(unet, torch.rand(3, 32, 32), tile_size=16, overlap=0.0, tta="flips8", batch_size=4)
    finally:
        handle.remove()
    assert calls == [32]  # 4 tiles x 8 variants


# --------------------------------------------------------------------------- numpy, dtypes, devices
def test_numpy_uint8_hwc_and_chw_scale_and_keep_the_layout(unet):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(37, 50, 3), dtype=np.uint8)
    expected = fastunet.predict(unet, torch.from_numpy(hwc).permute(2, 0, 1).float() / 255)
    y = fastunet.predict(unet, hwc)
    assert isinstance(y, np.ndarray) and y.shape == (37, 50, 1) and y.dtype == np.float32
    # Two fp32 routes to the same numbers (the scaling happens in a different place): the fp32 row.
    assert_close(torch.from_numpy(y[..., 0]), expected[0], "fp32", "HWC uint8")
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    y = fastunet.predict(unet, chw, tile_size=16)
    assert y.shape == (1, 37, 50)
    tiled = fastunet.predict(unet, torch.from_numpy(chw).float() / 255, tile_size=16)
    assert_close(torch.from_numpy(y), tiled, "fp32", "CHW uint8, tiles")
    floats = hwc.astype(np.float64) / 255  # float arrays are taken as they are
    assert_close(torch.from_numpy(fastunet.predict(unet, floats)[..., 0]), expected[0], "fp32", "HWC float64")
    batch = np.stack([hwc, hwc])  # NHWC
    assert fastunet.predict(unet, batch).shape == (2, 37, 50, 1)


def test_one_channel_model_takes_a_2d_array_and_returns_one():
    torch.manual_seed(3)
    model = _calibrate(fastunet.UNet(1, 1, base_channels=4, depth=2))
    a = np.random.default_rng(0).integers(0, 65536, size=(21, 30), dtype=np.uint16)
    y = fastunet.predict(model, a)
    assert y.shape == (21, 30)
    ref = fastunet.predict(model, torch.from_numpy(a.astype(np.float32) / 65535)[None])
    assert_close(torch.from_numpy(y), ref[0], "fp32", "uint16 scaled by 1/65535")
    multi = fastunet.UNet(1, 3, base_channels=4, depth=2, out_activation="softmax").eval()
    assert fastunet.predict(multi, a).shape == (21, 30, 3)


def test_tensor_family_dtype_and_mode_are_preserved():
    model = fastunet.UNet(3, 2, base_channels=4, depth=2, out_activation="softmax")
    model.train()
    model.conv1.conv[1].eval()  # a frozen BatchNorm in a training model: restored as it was
    x = torch.rand(3, 20, 20)
    y = fastunet.predict(model, x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 20, 20) and y.device == x.device
    assert not y.is_inference()
    y += 1  # the caller may modify it
    assert model.training and not model.conv1.conv[1].training and model.conv1.conv[4].training
    double = fastunet.UNet(3, 1, base_channels=4, depth=2).double().eval()
    assert fastunet.predict(double, x.double(), tile_size=16).dtype == torch.float64


def test_bf16_autocast_on_cpu_is_close_to_fp32(unet):
    x = torch.rand(1, 3, 40, 40)
    ref = fastunet.predict(unet, x, tile_size=32)
    y = fastunet.predict(unet, x, tile_size=32, dtype=torch.bfloat16)
    assert y.dtype == torch.float32  # accumulated in fp32
    assert (y - ref).abs().max().item() < 0.05


def test_nan_in_the_input_propagates(unet):
    x = torch.rand(1, 3, 64, 64)
    x[0, :, 30, 30] = float("nan")
    for kwargs in (
        {},
        {"tile_size": 32},
        {"tile_size": 32, "blend": "center"},
        {"tile_size": 32, "max_device_bytes": 1},
    ):
        with pytest.warns(fastunet.NonFiniteInputWarning, match=r"holds 3 NaN or Inf value\(s\)"):
            y = fastunet.predict(unet, x, **kwargs)
        assert torch.isnan(y[0, 0, 30, 30]), kwargs
        assert torch.isfinite(y[0, 0, 0, 0]) or kwargs == {}, kwargs  # far from it: still a number (tiles)


def test_progress_bar_counts_tiles(unet, capsys):
    fastunet.predict(unet, torch.rand(3, 64, 64), tile_size=32, overlap=0.0, progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "tile" in err


# --------------------------------------------------------------------------- host path and memmaps
@pytest.mark.parametrize("blend", ["gaussian", "constant", "center"])
def test_host_path_equals_device_path(unet, blend):
    x = torch.rand(2, 3, 150, 123)
    device = fastunet.predict(unet, x, tile_size=32, blend=blend)
    host = fastunet.predict(unet, x, tile_size=32, blend=blend, max_device_bytes=1)
    torch.testing.assert_close(host, device, atol=1e-6, rtol=1e-6)


def test_an_image_over_the_budget_gets_tiles_of_a_size_that_fits(unet):
    x = torch.rand(1, 3, 200, 120)
    whole = fastunet.predict(unet, x)
    shapes = []
    handle = unet.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[2:])))
    try:
        small = fastunet.predict(unet, x, max_device_bytes=3_000_000, overlap=0.5)
    finally:
        handle.remove()
    assert set(shapes) == {(28, 28)}
    assert small.shape == whole.shape
    # The budget picked the tiles; they are blended as explicitly asked-for tiles of that size
    # are. (Not compared with the whole image: this model's receptive field, 22 px each side, is
    # wider than a 28 px tile's margins, so no tile sees any pixel's whole context.)
    assert_close(small, fastunet.predict(unet, x, tile_size=28, overlap=0.5), "fp32", "budget-chosen tiles")


def test_center_blend_equals_the_whole_image_where_tiles_cover_the_receptive_field(unet):
    """The overlap-tile strategy is exact when every pixel's owning tile holds its receptive
    field: with overlap 0.5 a pixel is at most tile/4 from its tile's centre, so at least tile/4
    from the tile's edges (or on the image's own edge, padded as the whole image is). The
    windows start at multiples of ``2**depth`` here (rows 0, 48, 96, 104; columns 0, 24), so the
    pooling phases agree too."""
    assert tile_starts(200, 96, 0.5) == [0, 48, 96, 104] and tile_starts(120, 96, 0.5) == [0, 24]
    x = torch.rand(1, 3, 200, 120)
    probe = x.clone()
    probe[..., 100, 60] += 1
    with torch.no_grad():
        changed = (unet(probe) - unet(x)).abs()[0, 0].nonzero()
    reach = max((changed[:, 0] - 100).abs().max().item(), (changed[:, 1] - 60).abs().max().item())
    assert 0 < reach <= 24  # 96 / 4
    whole = fastunet.predict(unet, x)
    assert_close(fastunet.predict(unet, x, tile_size=96, overlap=0.5, blend="center"), whole, "fp32", "center")


def test_memmap_in_and_out(unet, tmp_path):
    rng = np.random.default_rng(0)
    src = np.lib.format.open_memmap(tmp_path / "in.npy", mode="w+", dtype=np.uint8, shape=(200, 90, 3))
    src[...] = rng.integers(0, 256, size=src.shape, dtype=np.uint8)
    src.flush()
    src = np.load(tmp_path / "in.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(200, 90, 1))
    got = fastunet.predict(unet, src, tile_size=32, out=out, max_device_bytes=1)
    assert got is out
    out.flush()
    expected = fastunet.predict(unet, np.array(src), tile_size=32)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)


def test_out_tensor_is_filled_and_returned(unet):
    x = torch.rand(3, 33, 17)
    out = torch.full((1, 33, 17), -1.0)
    assert fastunet.predict(unet, x, tile_size=16, out=out) is out
    torch.testing.assert_close(out, fastunet.predict(unet, x, tile_size=16))


# --------------------------------------------------------------------------- refused arguments
@pytest.mark.parametrize(
    "image, kwargs, message",
    [
        (torch.rand(4, 16, 16), {}, "expects 3 input channel"),
        (np.zeros((16, 16), np.float32), {}, "expects 3 channels"),
        (np.zeros((16, 16, 5), np.float32), {}, "expects 3 input channel"),
        (torch.rand(16, 16), {}, "[C, H, W]"),
        (torch.rand(3, 0, 16), {}, "H and W >= 1"),
        (torch.rand(3, 16, 16), {"tile_size": 2}, "multiple of 2**depth = 4, got 2; the nearest valid size is 4"),
        (torch.rand(3, 16, 16), {"tile_size": 30}, "got 30; the nearest valid size is 32"),
        (torch.rand(3, 16, 16), {"tile_size": (16, 0)}, "multiple of 2**depth"),
        (torch.rand(3, 16, 16), {"tile_size": "big"}, "int or a pair"),
        (torch.rand(3, 16, 16), {"overlap": 1.0}, "overlap must be a number in [0, 1)"),
        (torch.rand(3, 16, 16), {"overlap": -0.1}, "overlap must be a number in [0, 1)"),
        (torch.rand(3, 16, 16), {"blend": "mean"}, "blend must be one of ('gaussian', 'constant', 'center')"),
        (torch.rand(3, 16, 16), {"tta": "rot90"}, "tta must be one of (None, 'flips', 'flips8')"),
        (torch.rand(3, 16, 16), {"pad_mode": "circular"}, "pad_mode must be one of"),
        (torch.rand(3, 16, 16), {"batch_size": 0}, "batch_size must be an int >= 1"),
        (torch.rand(3, 16, 16), {"dtype": torch.int8}, "dtype must be one of"),
        (torch.rand(3, 16, 16), {"device": "meta"}, "move the model"),
        (
            torch.rand(3, 16, 16),
            {"out": np.zeros((16, 16), np.float32)},
            "out= must have the result's shape (1, 16, 16)",
        ),
        (torch.rand(3, 16, 16), {"out": np.zeros((1, 16, 16), np.uint8)}, "floating-point"),
        (torch.rand(3, 16, 16), {"max_device_bytes": 0}, "max_device_bytes must be a positive int"),
    ],
)
def test_bad_input_is_refused_before_any_work(unet, image, kwargs, message):
    calls = []
    handle = unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError) as exc:
            fastunet.predict(unet, image, **kwargs)
    finally:
        handle.remove()
    assert message in str(exc.value)
    assert not calls


def test_a_model_without_the_contract_is_refused():
    with pytest.raises(TypeError, match="depth"):
        fastunet.predict(nn.Conv2d(3, 1, 1), torch.rand(3, 8, 8))


# --------------------------------------------------------------------------- benchmark case
def test_benchmark_predict_mode_runs_and_reports_the_overhead(tmp_path, capsys):
    """``python benchmarks/run.py --mode predict`` (in-process, its CPU smoke size)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import run

    assert run.main(["--mode", "predict", "--device", "cpu", "--quick", "--reps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "predict overhead:" in out and "raw_tiles" in out and "fastunet_predict" in out
    (path,) = tmp_path.glob("*_predict_quick.json")
    result = json.loads(path.read_text())
    rows = {r["provider"]: r for r in result["rows"]}
    assert rows["fastunet_predict"]["status"] == "ok" and rows["fastunet_predict"]["vs_raw"] > 0
    assert result["config"]["tiles"] == 9 and result["overhead"]["threshold"] == 1.15
    monai = rows["monai_swi"]
    assert monai["status"] == "skipped" or monai["max_abs_diff_vs_predict"] < 1e-5


def test_the_docs_predict_example_runs_as_written(tmp_path):
    """docs/predict.md's block (tagged ``readme-test: predict``), on CPU."""
    from test_readme import doc_blocks, run_block

    (block,) = doc_blocks("predict")
    namespace, _ = run_block(block, tmp_path)
    assert namespace["probs"].shape == (600, 800, 1) and namespace["probs"].dtype == np.float32
    assert namespace["mask"].shape == (600, 800)


def test_numpy_scalars_are_accepted_for_sizes_and_fractions(unet):
    x = torch.rand(3, 40, 40)
    y = fastunet.predict(unet, x, tile_size=np.int64(16), overlap=np.float32(0.5), batch_size=np.int32(3))
    torch.testing.assert_close(y, fastunet.predict(unet, x, tile_size=16, overlap=0.5, batch_size=3))

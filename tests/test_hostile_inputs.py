"""Issue 22, case by case: nothing lost, nothing silently wrong, every bad input one clear error.

Each test is one case a careful user or a fuzzer found (tests/test_fuzz_readers.py turns the
readers over at random). The CLI cases check the exit status (2: usage, nothing done; 1: a file
or the weights failed), that each error is one line without a traceback, and that the API raises
the package's own exception with the same text.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_files import deflate_tiff_bomb, png_bytes, png_from_header, tiny_unet

import fastunet
from fastunet import cli, imageio
from fastunet.errors import CheckpointError, FastUNetError, ImageError, LimitError, NonFiniteInputWarning

PIL = pytest.importorskip("PIL")
tifffile = pytest.importorskip("tifffile")
from PIL import Image  # noqa: E402

_PREDICT_MODULE = sys.modules["fastunet.predict"]  # the module (fastunet.predict is the function)


@pytest.fixture
def limits():
    """``fastunet.set_limits`` for one test, undone after it."""
    changed = {}

    def set_(**kw):
        changed.update({k: v for k, v in fastunet.set_limits(**kw).items() if k not in changed})

    yield set_
    fastunet.set_limits(**changed)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = tiny_unet()
    path = tmp_path_factory.mktemp("weights") / "unet.pt"
    torch.save(model.state_dict(), path)
    return path


def rgb_png(path: Path, h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return image


def predict_cli(capsys, *args) -> tuple[int, str, str]:
    status = cli.main(["predict", "--no-progress", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str, status: int) -> str:
    """The single line of an error run: no traceback, no usage block."""
    lines = err.strip().splitlines()
    assert status in (1, 2) and "Traceback" not in err and "usage:" not in err, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_predict(monkeypatch):
    """Fails the test if predict runs: refusals must come before any compute."""

    def refuse(*args, **kwargs):
        raise AssertionError("predict ran")

    monkeypatch.setattr(_PREDICT_MODULE, "predict", refuse)


# =========================================================================== 1. data loss
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, weights, capsys, no_predict):
    rgb_png(tmp_path / "a.png")
    rgb_png(tmp_path / "a_mask.png", seed=1)
    before = (tmp_path / "a_mask.png").read_bytes()
    for extra in ([], ["--overwrite"]):
        status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "a.png", tmp_path / "a_mask.png",
                                     "--out", tmp_path, *extra)  # fmt: skip
        line = one_error_line(err, status)
        assert status == 2 and "a_mask.png" in line and "is also an input" in line
    assert (tmp_path / "a_mask.png").read_bytes() == before


def test_an_input_reached_through_a_symlink_is_not_written_over(tmp_path, weights, capsys, no_predict):
    rgb_png(tmp_path / "a.png")
    (tmp_path / "o").mkdir()
    os.symlink(tmp_path / "a.png", tmp_path / "o" / "a_mask.png")
    status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "a.png", "--out", tmp_path / "o",
                                 "--overwrite")  # fmt: skip
    assert status == 2 and "is also an input" in one_error_line(err, status)


def test_an_existing_output_is_refused_before_any_work_unless_overwrite(tmp_path, weights, capsys, monkeypatch):
    rgb_png(tmp_path / "a.png")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "a_probs.npy").write_bytes(b"precious")
    real_predict = _PREDICT_MODULE.predict
    with monkeypatch.context() as m:
        m.setattr(_PREDICT_MODULE, "predict", lambda *a, **k: pytest.fail("predict ran"))
        status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "a.png", "--out", tmp_path / "o",
                                     "--save-probs", "npy")  # fmt: skip
    line = one_error_line(err, status)
    assert status == 2 and "a_probs.npy exists" in line and "--overwrite" in line
    assert (tmp_path / "o" / "a_probs.npy").read_bytes() == b"precious"
    assert not (tmp_path / "o" / "a_mask.png").exists()  # nothing written for any input
    assert _PREDICT_MODULE.predict is real_predict
    status, _, _ = predict_cli(capsys, "--weights", weights, tmp_path / "a.png", "--out", tmp_path / "o",
                               "--save-probs", "npy", "--overwrite")  # fmt: skip
    assert status == 0 and np.load(tmp_path / "o" / "a_probs.npy").shape == (20, 24)


_KILL_SCRIPT = """
import os, signal, sys
# A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and Python then installs no handler: restore the one an interactive run has.
signal.signal(signal.SIGINT, signal.default_int_handler)
import torch
import fastunet
from fastunet import cli

calls = []
forward = fastunet.UNet.forward

def dying_forward(self, x):
    calls.append(1)
    if len(calls) == 2:  # the probabilities file exists and is half filled
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return forward(self, x)

fastunet.UNet.forward = dying_forward
sys.exit(cli.main(["predict", "--no-progress", "--weights", sys.argv[2], sys.argv[3], "--out", sys.argv[4],
                   "--save-probs", "npy", "--tile", "16", "--batch-size", "1"]))
"""


@pytest.mark.slow  # a CLI subprocess per signal (~5 s each)
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_a_run_killed_mid_write_leaves_no_file_under_a_final_name(tmp_path, weights, sig):
    rgb_png(tmp_path / "a.png", 48, 48)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, sig, str(weights), str(tmp_path / "a.png"),
                          str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    if sig == "SIGKILL":
        assert run.returncode == -signal.SIGKILL
    else:
        assert run.returncode == 130 and "interrupted" in run.stderr and "Traceback" not in run.stderr
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert not [n for n in names if not n.startswith(".")], names  # no a_probs.npy, no a_mask.png
    # SIGKILL cannot be cleaned up after: its temporary file stays, named as one; Ctrl-C removes it.
    assert all(".partial." in n for n in names) and (not names or sig == "SIGKILL"), names


def test_one_unreadable_image_is_reported_and_the_others_are_written(tmp_path, weights, capsys):
    rgb_png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png at all")
    rgb_png(tmp_path / "c.png")
    status, out, err = predict_cli(capsys, "--weights", weights, *(tmp_path / n for n in ("a.png", "b.png", "c.png")),
                                   "--out", tmp_path / "o")  # fmt: skip
    assert status == 1 and "Traceback" not in err
    errors = err.strip().splitlines()
    with pytest.raises(ImageError) as exc:
        imageio.read_image(tmp_path / "b.png", 3)
    assert len(errors) == 2 and errors[0] == f"fastunet predict: error: {exc.value}"  # the API's text
    assert "b.png: cannot read it as an image" in errors[0] and errors[0].count("b.png") == 1
    assert errors[1] == f"fastunet predict: 1 of 3 image(s) failed: {tmp_path / 'b.png'}"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_mask.png", "c_mask.png"]
    assert "a.png" in out and "c.png" in out


# =========================================================================== 2. sizes from files
@pytest.fixture
def real_builds(monkeypatch):
    """The U-Nets built off the meta device while the test runs (their depths)."""
    built = []
    init = fastunet.UNet.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not next(self.parameters()).is_meta:
            built.append(self.depth)

    monkeypatch.setattr(fastunet.UNet, "__init__", spy)
    return built


def test_milesial_depth_from_a_key_is_bounded_before_allocating(real_builds, limits):
    from milesial_unet import MilesialUNet

    from fastunet.convert import from_milesial

    sd = dict(MilesialUNet(3, 2, base=4).state_dict(), **{"down13.x": torch.zeros(1)})
    with pytest.raises(LimitError, match=r"depth \(13\) is over the limit depth=8.*FASTUNET_LIMITS=depth=13"):
        from_milesial(sd)
    limits(depth=13)  # trusted: the limit raised, the file is still checked before a model is allocated
    with pytest.raises(CheckpointError, match="missing key"):
        from_milesial(sd)
    assert real_builds == []


def test_cli_checkpoint_depth_from_a_key_is_bounded_before_allocating(tmp_path, capsys, real_builds, monkeypatch):
    sd = dict(tiny_unet().state_dict(), **{"conv23.conv.0.weight": torch.zeros(1, 1, 3, 3)})
    torch.save(sd, tmp_path / "big.pt")
    rgb_png(tmp_path / "a.png")
    real_builds.clear()  # tiny_unet() above
    args = ("--weights", tmp_path / "big.pt", tmp_path / "a.png", "--out", tmp_path / "o", "--out-ch", 1)
    status, _, err = predict_cli(capsys, *args)
    assert status == 1 and "depth (11) is over the limit depth=8" in one_error_line(err, status)
    monkeypatch.setenv("FASTUNET_LIMITS", "depth=11")
    status, _, err = predict_cli(capsys, *args)
    assert status == 1 and "does not fit UNet(3, 1, base_channels=4, depth=11)" in one_error_line(err, status)
    assert real_builds == []


def test_a_deflate_tiff_bomb_is_refused_from_its_header(tmp_path, weights, capsys):
    deflate_tiff_bomb(tmp_path / "bomb.tif", 60000)
    assert (tmp_path / "bomb.tif").stat().st_size < 200_000
    with pytest.raises(LimitError, match=r"60000x60000.*image_pixels=89,478,485"):
        imageio.read_image(tmp_path / "bomb.tif", 3)
    status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "bomb.tif", "--out", tmp_path / "o")
    assert status == 1 and "over the limit image_pixels" in err and "Traceback" not in err


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 Mpixel: Pillow only warned; 400: Pillow's own error
def test_a_large_png_is_refused_from_its_header_with_one_clear_error(tmp_path, side):
    path = tmp_path / "big.png"
    path.write_bytes(png_from_header(side, side, 8, 2, zlib.compress(b"")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(
            LimitError, match=rf"{side}x{side} pixels \({side * side:,}\) is over the limit image_pixels"
        ):
            imageio.read_image(path, 3)


def test_the_pixel_limit_can_be_raised_and_lowered(tmp_path, limits, monkeypatch):
    rgb_png(tmp_path / "a.png", 4, 4)
    limits(image_pixels=15)
    with pytest.raises(LimitError, match=r"4x4 pixels \(16\).*set_limits\(image_pixels=16\)"):
        imageio.read_image(tmp_path / "a.png", 3)
    limits(image_pixels=16)
    assert imageio.read_image(tmp_path / "a.png", 3).shape == (4, 4, 3)
    limits(image_pixels=None)  # back to the environment variable, then the default
    monkeypatch.setenv("FASTUNET_LIMITS", "image_pixels=15")
    with pytest.raises(LimitError):
        imageio.read_image(tmp_path / "a.png", 3)
    monkeypatch.setenv("FASTUNET_LIMITS", "image_pixels=lots")
    with pytest.raises(ValueError, match="FASTUNET_LIMITS: limit image_pixels must be a positive integer"):
        imageio.read_image(tmp_path / "a.png", 3)
    with pytest.raises(ValueError, match="unknown limit 'pixels'"):
        fastunet.set_limits(pixels=3)


def test_a_grey_memory_mapped_tiff_is_not_expanded_into_memory(tmp_path, weights, capsys):
    grey = np.random.default_rng(0).integers(0, 65536, (40, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "g.tif", grey)
    image = imageio.read_image(tmp_path / "g.tif", 3)
    assert image.shape == (40, 30, 3) and image.strides[-1] == 0 and imageio.is_mapped(image)
    assert not image.flags.owndata
    status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "g.tif", "--out", tmp_path / "o",
                                 "--save-probs", "npy")  # fmt: skip
    assert status == 0, err
    model = tiny_unet()
    expected = fastunet.predict(model, np.repeat(grey[..., None], 3, -1))[..., 0]
    np.testing.assert_allclose(np.load(tmp_path / "o" / "g_probs.npy"), expected, atol=1e-6)


def test_a_memory_mapped_input_gets_memory_mapped_probabilities_on_disk(tmp_path, weights, capsys, monkeypatch):
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((24, 24, 3), np.uint8))
    seen = []
    real = _PREDICT_MODULE.predict

    def spy(model, image, *, out=None, **kw):
        seen.append(imageio.is_mapped(out) if out is not None else False)
        return real(model, image, out=out, **kw)

    monkeypatch.setattr(_PREDICT_MODULE, "predict", spy)
    status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "g.tif", "--out", tmp_path / "o")
    assert status == 0, err
    assert seen == [True]  # not saved (no --save-probs): a scratch file in --out, removed after
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["g_mask.png"]


def _saved(tmp_path: Path, model=None) -> Path:
    (model or tiny_unet()).save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


@pytest.mark.parametrize(
    "text, error, message",
    [
        (b'{"format": "fastunet\xff"}', CheckpointError, "is not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, CheckpointError, "nested too deeply"),
        (b" " * (2 << 20), LimitError, "over the limit config_bytes=1,048,576"),
    ],
)
def test_a_config_that_is_not_text_nested_or_oversized_is_refused(tmp_path, text, error, message):
    path = _saved(tmp_path)
    (path / "config.json").write_bytes(text)
    with pytest.raises(error, match=message):
        fastunet.UNet.from_pretrained(path)


@pytest.mark.parametrize(
    "key, value, error, message",
    [
        ("depth", 40, LimitError, r"depth \(40\) is over the limit depth=8"),
        ("base_channels", 1 << 20, LimitError, "channels of the deepest level"),
        ("out_ch", 10**9, LimitError, "input/output channels"),
        ("depth", "4", CheckpointError, "depth must be a positive integer, got '4'"),
        ("in_ch", 0, CheckpointError, "in_ch must be a positive integer, got 0"),
    ],
)
def test_config_sizes_are_bounded_before_building(tmp_path, key, value, error, message):
    import json

    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        fastunet.UNet.from_pretrained(path)


def test_a_zip_checkpoint_is_bounded_by_its_decompressed_size(tmp_path, limits):
    import zipfile

    from fastunet.loaders import read_state_dict

    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000, 1000)}, path)
    deflated = tmp_path / "deflated.pt"  # torch.load inflates deflated entries: a 4 MB tensor from 5 KB
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    assert deflated.stat().st_size < 20_000 and read_state_dict(deflated)["w"].shape == (1000, 1000)
    limits(file_bytes=1 << 20)
    with pytest.raises(LimitError, match="decompressed size in bytes"):
        read_state_dict(deflated)


def test_keras_depth_and_dataset_sizes_are_bounded(tmp_path, limits):
    h5py = pytest.importorskip("h5py")
    from fastunet.convert import from_keras

    layers = [np.zeros((3, 3, 1, 1), np.float32), np.zeros(1, np.float32)] * (5 * 13 + 3)  # 68 tiny convs: depth 13
    with pytest.raises(LimitError, match=r"depth \(13\)"):
        from_keras(layers)
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:  # a compressed dataset inflates to any size: its shape is checked first
        f.attrs["layer_names"] = [b"conv2d"]
        g = f.create_group("conv2d")
        g.attrs["weight_names"] = [b"conv2d/kernel:0"]
        g.create_dataset("conv2d/kernel:0", shape=(3, 3, 4096, 4096), dtype=np.float32, compression="gzip")
    limits(file_bytes=100 << 20)
    with pytest.raises(LimitError, match=r"weights in bytes .*over the limit file_bytes"):
        from_keras(path)


# =========================================================================== 3. silently wrong numbers
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.dtype(">u2"), np.dtype(">i2")])
def test_every_integer_dtype_up_to_16_bits_is_scaled_by_its_range(dtype):
    model = tiny_unet()
    info = np.iinfo(dtype)
    values = np.random.default_rng(0).integers(info.min, info.max, (16, 16, 3), endpoint=True).astype(dtype)
    expected = fastunet.predict(model, values.astype(np.float32) / info.max)
    np.testing.assert_allclose(fastunet.predict(model, values), expected, atol=1e-6)
    tensor = torch.from_numpy(values.astype(values.dtype.newbyteorder("="))).permute(2, 0, 1)  # tensors too
    np.testing.assert_allclose(fastunet.predict(model, tensor).permute(1, 2, 0).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64])
def test_wider_integers_are_refused_with_the_way_out(dtype):
    model = tiny_unet()
    name = np.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"{name} image has no conventional range.*astype\(np.float32\)"):
        fastunet.predict(model, np.zeros((16, 16, 3), dtype))
    if dtype in (np.int32, np.int64):
        with pytest.raises(ValueError, match=f"{name} image has no conventional range"):
            fastunet.predict(model, torch.zeros(3, 16, 16, dtype=getattr(torch, name)))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("interlace", [False, True])
def test_a_16_bit_png_keeps_all_16_bits(tmp_path, channels, interlace):
    image = np.random.default_rng(channels).integers(0, 65536, (13, 17, channels), dtype=np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes(image, interlace=interlace, seed=channels))
    got = imageio.read_image(path, channels)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got.reshape(image.shape), image)
    if channels in (2, 4):  # alpha dropped for the model without it, every bit of the rest kept
        np.testing.assert_array_equal(imageio.read_image(path, channels - 1).reshape(13, 17, -1), image[..., :-1])


def test_a_48_bit_png_through_the_cli_matches_predict_on_the_16_bit_values(tmp_path, weights, capsys):
    image = np.random.default_rng(1).integers(0, 65536, (20, 22, 3), dtype=np.uint16)
    (tmp_path / "deep.png").write_bytes(png_bytes(image))
    status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "deep.png", "--out", tmp_path / "o",
                                 "--save-probs", "npy")  # fmt: skip
    assert status == 0, err
    expected = fastunet.predict(tiny_unet(), image.astype(np.float32) / 65535)[..., 0]
    np.testing.assert_allclose(np.load(tmp_path / "o" / "deep_probs.npy"), expected, atol=1e-6)


def test_non_finite_inputs_warn_once_with_the_count(tmp_path, weights, capsys):
    model = tiny_unet()
    x = torch.rand(3, 64, 64)
    x[0, 5, 5], x[1, 7, 7], x[2, 9, 9] = float("inf"), float("nan"), -float("inf")
    with pytest.warns(NonFiniteInputWarning, match=r"holds 3 NaN or Inf value\(s\) of 12,288") as caught:
        fastunet.predict(model, x, tile_size=16)  # 49 tiles, one warning
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastunet.predict(model, torch.rand(3, 16, 16))  # finite: no warning
    tifffile.imwrite(tmp_path / "f.tif", x.permute(1, 2, 0).numpy(), photometric="rgb")
    status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "f.tif", "--out", tmp_path / "o")
    assert status == 0 and err.strip().splitlines() == [
        f"fastunet predict: warning: {tmp_path / 'f.tif'}: the input holds 3 NaN or Inf value(s) of 12,288; each "
        "spreads through the convolutions to every output pixel it reaches (NaN probabilities, 0 in a thresholded "
        "mask): replace them first (numpy.nan_to_num / torch.nan_to_num)"
    ]


def _damage(state: dict, how: str) -> tuple[dict, str]:
    state = {k: v.clone() for k, v in state.items()}
    if how == "nan running_var":
        state["conv2.conv.1.running_var"][0] = float("nan")
        return state, r"tensor 'conv2.conv.1.running_var' holds 1 NaN or Inf"
    if how == "negative running_var":
        state["conv2.conv.1.running_var"][1] = -0.5
        return state, r"tensor 'conv2.conv.1.running_var' \(a BatchNorm running variance\) has negative values"
    if how == "inf weight":
        state["conv3.conv.0.weight"][0, 0, 0, 0] = float("inf")
        return state, r"tensor 'conv3.conv.0.weight' holds 1 NaN or Inf"
    state["conv3.conv.0.weight"] = state["conv3.conv.0.weight"].half()
    return state, r"tensor 'conv3.conv.0.weight' is float16 while \d+ of the \d+ floating-point tensors are float32"


DAMAGE = ["nan running_var", "negative running_var", "inf weight", "mixed dtypes"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_weights_are_refused_by_from_pretrained_naming_the_tensor(tmp_path, how):
    from safetensors.torch import save_file

    path = _saved(tmp_path)
    state, message = _damage(tiny_unet().state_dict(), how)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        fastunet.UNet.from_pretrained(path)


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_weights_are_refused_by_the_cli_in_one_line(tmp_path, capsys, how):
    state, message = _damage(tiny_unet().state_dict(), how)
    torch.save(state, tmp_path / "w.pt")
    rgb_png(tmp_path / "a.png")
    status, _, err = predict_cli(capsys, "--weights", tmp_path / "w.pt", tmp_path / "a.png", "--out", tmp_path / "o")
    import re

    assert status == 1 and re.search(message, one_error_line(err, status))


@pytest.mark.parametrize("how", ["nan running_var", "negative running_var", "mixed dtypes"])
def test_damaged_weights_are_refused_by_from_milesial(how):
    from milesial_unet import MilesialUNet

    from fastunet.convert import from_milesial

    state = MilesialUNet(3, 2, base=4).state_dict()
    key = "down1.maxpool_conv.1.double_conv.1.running_var"
    if how == "nan running_var":
        state[key][0] = float("nan")
    elif how == "negative running_var":
        state[key][0] = -1.0
    else:
        state["outc.conv.weight"] = state["outc.conv.weight"].double()
    with pytest.raises(CheckpointError, match="'outc.conv.weight' is float64" if how == "mixed dtypes" else key):
        from_milesial(state)


# =========================================================================== 4. clear errors
def _write_weights(tmp_path: Path, kind: str) -> Path:
    good = tmp_path / "good.pt"
    torch.save(tiny_unet().state_dict(), good)
    if kind == "pickled object":
        path = tmp_path / "obj.pt"
        torch.save({"model": argparse.Namespace(layers=3)}, path)
    elif kind == "truncated":
        path = tmp_path / "half.pt"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        path = tmp_path / "empty.pt"
        path.write_bytes(b"")
    elif kind == "not torch":
        path = tmp_path / "text.pt"
        path.write_text("hello, I am not a checkpoint\n")
    else:
        path = tmp_path / "junk.safetensors"
        path.write_bytes(bytes(range(256)) * 3)
    return path


WEIGHT_FILES = {
    "pickled object": "holds Python objects other than tensors (argparse.Namespace)",
    "truncated": "is truncated: it starts as a PyTorch zip archive",
    "empty": "is empty (0 bytes)",
    "not torch": "is not a PyTorch checkpoint",
    "junk safetensors": "cannot be read as safetensors: truncated or corrupt",
}


@pytest.mark.parametrize("kind", WEIGHT_FILES)
def test_unreadable_weights_are_one_clear_error_without_torch_advice(tmp_path, capsys, kind):
    from fastunet.loaders import read_state_dict

    path = _write_weights(tmp_path, kind)
    with pytest.raises(CheckpointError) as exc:
        read_state_dict(path)
    assert WEIGHT_FILES[kind] in str(exc.value) and "weights_only" not in str(exc.value)
    rgb_png(tmp_path / "a.png")
    status, _, err = predict_cli(capsys, "--weights", path, tmp_path / "a.png", "--out", tmp_path / "o")
    line = one_error_line(err, status)
    assert status == 1 and line == f"fastunet predict: error: {exc.value}"  # the API's text, as the CLI's line
    if kind != "junk safetensors":
        from fastunet.convert import from_milesial

        with pytest.raises(CheckpointError, match=WEIGHT_FILES[kind].replace("(", r"\(").replace(")", r"\)")):
            from_milesial(path)


def test_the_cli_names_the_first_misfit_tensor_not_torch_s_truncated_header(tmp_path, capsys):
    state = tiny_unet().state_dict()
    state["conv2.conv.0.weight"] = torch.zeros(9, 4, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    rgb_png(tmp_path / "a.png")
    status, _, err = predict_cli(capsys, "--weights", tmp_path / "w.pt", tmp_path / "a.png", "--out", tmp_path / "o")
    assert one_error_line(err, status).endswith(
        "does not fit UNet(3, 1, base_channels=4, depth=2): tensor 'conv2.conv.0.weight' has shape [9, 4, 3, 3], the "
        "model needs [8, 4, 3, 3]"
    )


def test_non_numeric_conv_keys_are_named(tmp_path, capsys):
    torch.save(dict(tiny_unet().state_dict(), **{"convx.conv.0.weight": torch.zeros(1)}), tmp_path / "w.pt")
    rgb_png(tmp_path / "a.png")
    status, _, err = predict_cli(capsys, "--weights", tmp_path / "w.pt", tmp_path / "a.png", "--out", tmp_path / "o")
    assert status == 1 and "unexpected tensor 'convx.conv.0.weight'" in one_error_line(err, status)


def test_a_pillow_decompression_bomb_is_our_limit_error_in_the_cli(tmp_path, weights, capsys):
    (tmp_path / "bomb.png").write_bytes(png_from_header(20000, 20000, 8, 0, zlib.compress(b"")))
    status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "bomb.png", "--out", tmp_path / "o")
    lines = err.strip().splitlines()
    assert status == 1 and "Traceback" not in err and len(lines) == 2
    assert "20000x20000 pixels (400,000,000) is over the limit image_pixels" in lines[0]
    assert "DecompressionBomb" not in err


def test_out_that_is_a_file_is_refused_before_loading_anything(tmp_path, weights, capsys, monkeypatch):
    rgb_png(tmp_path / "a.png")
    (tmp_path / "o").write_text("a file")
    monkeypatch.setattr(sys.modules["fastunet.formats"], "read", lambda *a, **k: pytest.fail("loaded"))
    status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "a.png", "--out", tmp_path / "o")
    assert status == 2 and "--out" in one_error_line(err, status) and "is a file, not a folder" in err


def test_out_that_cannot_be_written_is_refused_before_loading_anything(tmp_path, weights, capsys, monkeypatch):
    rgb_png(tmp_path / "a.png")
    (tmp_path / "o").mkdir()
    os.chmod(tmp_path / "o", 0o500)
    monkeypatch.setattr(sys.modules["fastunet.formats"], "read", lambda *a, **k: pytest.fail("loaded"))
    try:
        if os.access(tmp_path / "o", os.W_OK):  # root: the permission bits do not stop it; a mount point would
            import fastunet.atomic as atomic

            def denied(folder, suffix):
                raise PermissionError(13, "Permission denied", str(folder))

            monkeypatch.setattr(atomic, "scratch_path", denied)
        status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "a.png", "--out", tmp_path / "o")
    finally:
        os.chmod(tmp_path / "o", 0o700)
    assert status == 2 and one_error_line(err, status).endswith("cannot be written: Permission denied")


@pytest.mark.parametrize(
    "dtype, advice",
    [
        (torch.uint8, r"x.float\(\) / 255"),
        (torch.int16, r"x.float\(\) / 32767"),
        (torch.int64, r"int64 has no conventional range"),
        (torch.bool, r"x.float\(\)"),
    ],
)
@pytest.mark.parametrize("cls", [fastunet.UNet, fastunet.UNetReference])
def test_an_integer_tensor_input_gets_advice_for_its_dtype(cls, dtype, advice):
    model = cls(3, 1, base_channels=4, depth=2)
    with pytest.raises(TypeError, match=advice) as exc:
        model(torch.zeros(1, 3, 16, 16, dtype=dtype))
    assert dtype == torch.uint8 or "/ 255" not in str(exc.value)


@pytest.mark.parametrize("shape", [(1, 3, 0, 16), (1, 3, 16, 0)])
@pytest.mark.parametrize("odd_sizes", ["error", "pad"])
def test_an_input_of_height_or_width_zero_is_refused(shape, odd_sizes):
    for cls in (fastunet.UNet, fastunet.UNetReference):
        model = cls(3, 1, base_channels=4, depth=2, odd_sizes=odd_sizes)
        with pytest.raises(ValueError, match=r"H=0|W=0"):
            model(torch.zeros(shape))


def test_out_may_be_a_tensor_for_an_array_input_and_the_reverse():
    model = tiny_unet()
    image = np.random.default_rng(0).random((20, 16, 3), dtype=np.float32)
    expected = fastunet.predict(model, image)
    out = torch.full((20, 16, 1), -1.0)
    assert fastunet.predict(model, image, out=out, tile_size=16) is out
    np.testing.assert_allclose(out.numpy(), fastunet.predict(model, image, tile_size=16), atol=1e-6)
    out = torch.full((20, 16, 1), -1.0)
    assert fastunet.predict(model, image, out=out) is out
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    arr = np.full((1, 20, 16), -1.0, np.float32)
    assert fastunet.predict(model, torch.from_numpy(image).permute(2, 0, 1), out=arr) is arr
    np.testing.assert_allclose(arr, expected.transpose(2, 0, 1), atol=1e-6)


def test_a_read_only_float_memmap_raises_no_torch_warning(tmp_path, weights, capsys):
    planar = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", planar, photometric="rgb", planarconfig="separate")
    status, _, err = predict_cli(capsys, "--weights", weights, tmp_path / "f.tif", "--out", tmp_path / "o")
    assert status == 0 and err == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastunet.predict(tiny_unet(), tifffile.memmap(tmp_path / "f.tif", mode="r"))


def test_debug_shows_the_traceback(tmp_path, capsys):
    path = _write_weights(tmp_path, "empty")
    rgb_png(tmp_path / "a.png")
    with pytest.raises(CheckpointError):
        cli.main(["predict", "--debug", "--weights", str(path), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")])


def test_argparse_errors_are_one_line_with_status_2(capsys):
    assert cli.main(["predict", "--nonsense"]) == 2
    line = one_error_line(capsys.readouterr().err, 2)
    assert line.startswith("fastunet predict: error:") and "--help" in line


def test_read_image_raises_image_error_for_what_is_not_an_image(tmp_path):
    for name, data in (("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40), ("b.jpg", b"\xff\xd8\xff" + b"\0" * 10),
                       ("c.tif", b"II*\x00" + b"\xff" * 12), ("d.bmp", b"")):  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=name.replace(".", r"\.")):
            imageio.read_image(tmp_path / name, 3)


def test_the_errors_are_documented_package_types():
    assert issubclass(CheckpointError, FastUNetError) and issubclass(CheckpointError, ValueError)
    assert issubclass(ImageError, FastUNetError) and issubclass(LimitError, FastUNetError)
    assert fastunet.CheckpointError is CheckpointError and fastunet.LimitError is LimitError
    assert fastunet.ImageError is ImageError and fastunet.NonFiniteInputWarning is NonFiniteInputWarning
    for error in (FastUNetError, CheckpointError, ImageError, LimitError, NonFiniteInputWarning):
        assert error.__doc__ and error.__name__ in fastunet.__all__


# =========================================================================== the pieces
def test_atomic_path_replaces_only_when_complete(tmp_path):
    from fastunet.atomic import atomic_path

    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert final.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.") and tmp.name.endswith(".partial.bin")
        tmp.write_bytes(b"new")
        assert final.read_bytes() == b"old"
    assert final.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert final.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600


def test_atomic_files_moves_companions_first_and_nothing_on_failure(tmp_path, monkeypatch):
    from fastunet import atomic

    final = tmp_path / "m.onnx"
    final.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_files(final) as staged:
        staged.write_bytes(b"half")
        (staged.parent / "m.onnx.data").write_bytes(b"weights")
        raise KeyboardInterrupt
    assert final.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(FileNotFoundError, match="did not create m.onnx"), atomic.atomic_files(final):
        pass
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (moved.append(Path(b).name), real_replace(a, b)))
    with atomic.atomic_files(final) as staged:
        assert (
            staged.name == "m.onnx" and staged.parent.parent == tmp_path and staged.parent.name.startswith(".m.onnx.")
        )
        staged.write_bytes(b"new")
        (staged.parent / "m.onnx.data").write_bytes(b"weights")
    assert moved == ["m.onnx.data", "m.onnx"]  # the file naming the others appears last
    assert final.read_bytes() == b"new" and (tmp_path / "m.onnx.data").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_an_interrupted_save_pretrained_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    path = _saved(tmp_path)
    before = {name: (path / name).read_bytes() for name in ("config.json", "model.safetensors")}

    def dies_half_way(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        tiny_unet(seed=1).save_pretrained(path)
    assert {name: (path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in path.iterdir()) == sorted(before)
    fastunet.UNet.from_pretrained(path)


def test_set_limits_returns_what_restores_it(monkeypatch):
    monkeypatch.delenv("FASTUNET_LIMITS", raising=False)
    assert fastunet.get_limit("depth") == 8
    previous = fastunet.set_limits(depth=12, image_pixels="1e6")
    try:
        assert previous == {"depth": None, "image_pixels": None}
        assert fastunet.get_limit("depth") == 12 and fastunet.get_limit("image_pixels") == 1_000_000
        monkeypatch.setenv("FASTUNET_LIMITS", "depth=9")
        assert fastunet.get_limit("depth") == 12  # set_limits wins over the environment
    finally:
        fastunet.set_limits(**previous)
    assert fastunet.get_limit("depth") == 9
    with pytest.raises(ValueError, match="must be a positive integer"):
        fastunet.set_limits(depth=0)

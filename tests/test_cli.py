"""The ``fastunet`` command (``python -m fastunet``): help, argument checks, the GPU-less
answer of ``tune`` (tuning itself is tested in tests/test_tuning.py, simulated GPU), ``predict``
end to end on PNG and TIFF files it writes (in-process, tiny model), and ``bench``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_live, randomize_batchnorm

from fastunet import cli


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastunet", *args], capture_output=True, text=True, env=env)


@pytest.mark.slow  # one subprocess per subcommand (~4 s)
def test_help_lists_every_option_with_defaults_and_examples():
    out = run("tune", "--help")
    assert out.returncode == 0
    for option in ("--batch", "--size", "--height", "--width", "--dtype", "--mode", "--in-ch", "--out-ch",
                   "--base-channels", "--depth", "--device"):  # fmt: skip
        assert option in out.stdout, option
    assert "(default: 16)" in out.stdout and "examples:" in out.stdout
    top = run("--help")
    assert top.returncode == 0 and "tune" in top.stdout


@pytest.mark.slow  # one CLI subprocess per bad argument (~4 s)
def test_bad_arguments_are_refused_with_a_reason():
    out = run("tune", "--batch", "0")
    assert out.returncode == 2 and "must be >= 1" in out.stderr
    out = run("tune", "--dtype", "fp64")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = run()
    assert out.returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_tune_without_a_gpu_says_why():
    out = run("tune", "--batch", "2", "--size", "64")
    assert out.returncode == 2 and "needs an NVIDIA GPU" in out.stderr


def test_sizes_must_fit_the_depth(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.main(["tune", "--size", "250"]) == 2


# --------------------------------------------------------------------------- predict
PREDICT_OPTIONS = ("--weights", "--preset", "--out", "--in-ch", "--out-ch", "--base-channels", "--depth", "--out-activation",
                   "--tile", "--overlap", "--blend", "--batch-size", "--tta", "--pad-mode", "--dtype", "--device",
                   "--threshold", "--save-probs", "--no-mask", "--max-device-mb", "--no-progress", "--overwrite",
                   "--debug")  # fmt: skip


def _help(capsys, monkeypatch, *args) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # one line per option: no default split by the wrapping
    assert cli.main([*args, "--help"]) == 0
    return capsys.readouterr().out


def test_predict_help_lists_every_option_with_its_default_and_examples(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, "predict")
    for option in PREDICT_OPTIONS:
        assert option in out, option
    for default in ("(default: 0.25)", "(default: gaussian)", "(default: 8)", "(default: none)", "(default: reflect)",
                    "(default: fp32)", "(default: auto)", "(default: 0.5)", "(default: not written)",
                    "(default: from the checkpoint)", "(default: the checkpoint's"):  # fmt: skip
        assert default in out, default
    assert "examples:" in out and "files written" in out and "_mask.png" in out and "_probs.npy" in out
    top = _help(capsys, monkeypatch)
    assert "predict" in top and "bench" in top and "tune" in top and "examples:" in top


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import fastunet

    torch.manual_seed(3)
    model = live_model(fastunet.UNet(3, 1, base_channels=4, depth=2))
    path = tmp_path_factory.mktemp("ckpt") / "unet.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # the common wrapper
    return path, model.eval()


def live_model(model):
    """Calibrated BatchNorm statistics and O(1) activations (``randomize_batchnorm`` with a sample):
    the output depends on the input, so comparing the CLI's files with the API checks something."""
    randomize_batchnorm(model, torch.rand(2, model.in_ch, 32, 32))
    assert_live(model, model.in_ch, 32)
    return model.eval()


def _predict_cli(*args):
    return cli.main(["predict", "--no-progress", *map(str, args)])


def test_predict_end_to_end_on_png_and_16_bit_tiff(tmp_path, checkpoint):
    pytest.importorskip("PIL")
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    import fastunet

    ckpt, model = checkpoint
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    deep = rng.integers(0, 65536, size=(38, 52, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "scan.tif", deep)
    out = tmp_path / "out"
    assert _predict_cli("--weights", ckpt, tmp_path / "photo.png", tmp_path / "scan.tif", "--out", out,
                        "--tile", 32, "--tta", "flips", "--save-probs", "npy", "--threshold", 0.5) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "photo_mask.png",
        "photo_probs.npy",
        "scan_mask.png",
        "scan_probs.npy",
    ]
    for name, image, scale in (("photo", rgb, 255), ("scan", deep, 65535)):
        expected = fastunet.predict(model, torch.from_numpy(image.astype(np.float32) / scale).permute(2, 0, 1),
                                    tile_size=32, tta="flips")[0].numpy()  # fmt: skip
        probs = np.load(out / f"{name}_probs.npy")
        assert probs.shape == image.shape[:2] and probs.dtype == np.float32
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask, np.where(expected >= 0.5, 255, 0))


def test_predict_multiclass_tiff_probs_argmax_mask_and_gray_input(tmp_path):
    pytest.importorskip("PIL")
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    import fastunet

    torch.manual_seed(4)
    model = live_model(fastunet.UNet(3, 3, base_channels=4, depth=2, out_activation="softmax"))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    gray = np.random.default_rng(1).integers(0, 256, size=(30, 41), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")  # gray: repeated to RGB for a 3-channel model
    assert _predict_cli("--weights", tmp_path / "m.pt", "--out-activation", "softmax", tmp_path / "g.png",
                        "--out", tmp_path, "--save-probs", "tiff", "--blend", "center", "--tile", 16) == 0  # fmt: skip
    probs = tifffile.imread(tmp_path / "g_probs.tif")
    rgb = torch.from_numpy(gray.astype(np.float32) / 255)[None].repeat(3, 1, 1)
    expected = fastunet.predict(model, rgb, tile_size=16, blend="center").permute(1, 2, 0).numpy()
    assert probs.shape == (30, 41, 3)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g_mask.png")), expected.argmax(-1))


def test_predict_logits_head_writes_probabilities(tmp_path, checkpoint):
    pytest.importorskip("PIL")
    from PIL import Image

    import fastunet

    ckpt, model = checkpoint
    rgb = np.random.default_rng(2).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    assert _predict_cli("--weights", ckpt, "--out-activation", "none", tmp_path / "x.png", "--out", tmp_path,
                        "--save-probs", "npy", "--no-mask") == 0  # fmt: skip
    assert not (tmp_path / "x_mask.png").exists()
    # The logits model with these weights is the sigmoid model before its sigmoid.
    np.testing.assert_allclose(np.load(tmp_path / "x_probs.npy"), fastunet.predict(model, rgb)[..., 0], atol=1e-6)


@pytest.mark.parametrize(
    "args, message, status",
    [
        (["--no-mask"], "writes nothing", 2),
        (["--tile", "30"], "multiple of 2**depth = 4", 2),
        (["--overlap", "1"], "must be in [0, 1)", 2),
        (["--tile", "8", "8", "8"], "N or H W", 2),
        (["--device", "nonsense"], "is not a device", 2),
        (["--in-ch", "1"], "does not fit UNet(1, 1", 1),
    ],
)
def test_predict_bad_arguments_say_why(tmp_path, checkpoint, capsys, args, message, status):
    pytest.importorskip("PIL")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    assert _predict_cli("--weights", checkpoint[0], tmp_path / "a.png", "--out", tmp_path / "o", *args) == status
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "a_mask.png").exists()


def test_predict_refuses_bad_inputs_before_work(tmp_path, checkpoint, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "x.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    for inputs, message in (([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"], "the same output names"),
                            ([tmp_path / "notes.txt"], "unsupported file type"),
                            ([tmp_path / "missing.png"], "no such file")):  # fmt: skip
        assert _predict_cli("--weights", checkpoint[0], *inputs, "--out", tmp_path / "o") == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "module, suffix, message", [("PIL", ".png", "needs Pillow"), ("tifffile", ".tif", "need tifffile")]
)
def test_predict_says_which_package_is_missing(tmp_path, checkpoint, capsys, monkeypatch, module, suffix, message):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    (tmp_path / f"a{suffix}").write_bytes(b"")
    status = _predict_cli("--weights", checkpoint[0], tmp_path / f"a{suffix}", "--out", tmp_path / "o", "--no-mask",
                          "--save-probs", "npy")  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and 'pip install "fastunet[predict]"' in err


# --------------------------------------------------------------------------- bench
@pytest.mark.slow  # runs benchmarks/run.py --quick in a subprocess (~5 s)
def test_bench_runs_the_suite_from_the_checkout():
    out = run("bench", "--help")
    assert out.returncode == 0, out.stderr
    assert "python benchmarks/run.py" in out.stdout and "--mode" in out.stdout and "(default" in out.stdout


def test_bench_without_a_checkout_says_where_it_lives(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_bench_script", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks/run.py not found" in err and "repository checkout" in err and "examples:" in err

"""Every command x every checkpoint format: ``predict``, ``tune`` (the model it tunes; tuning
itself needs a GPU), ``bench`` (the architecture and weights it benchmarks), ``info`` and
``convert`` (bit-exact round trips through a save_pretrained folder, Keras .h5 and milesial
.pth), with the safety of ``convert`` (never over an input, never over an output without
``--overwrite``, nothing half-written) and one line per error for hostile files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_files import KINDS, classic_model, make, milesial_model

import fastunet
from fastunet import CheckpointError, cli

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

KERAS_KINDS = [k for k in KINDS if k.startswith(("keras", "tf-keras"))]
MILESIAL_KINDS = ["milesial", "milesial-bilinear"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every kind of checkpoint, written once for the module (read-only for the tests)."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for kind in KINDS:
        (root / kind).mkdir()
        out[kind] = make(kind, root / kind)
    return out


def command(capsys, *args) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_same_state(model, expected: dict) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())


# --------------------------------------------------------------------------- predict
@pytest.mark.parametrize("kind", list(KINDS))
def test_predict_reads_every_format(tmp_path, capsys, files, kind):
    path, _ = files[kind]
    model = fastunet.load(path)
    rgb = np.random.default_rng(0).integers(0, 256, size=(16, 16, model.in_ch), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")  # RGB, or grey + alpha for the 2-channel Keras model
    status, _, err = command(capsys, "predict", "--no-progress", "--weights", path, tmp_path / "a.png",
                             "--out", tmp_path / "o", "--save-probs", "npy")  # fmt: skip
    assert status == 0 and err == ""
    logits = fastunet.predict(model, torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)).numpy()
    if model.out_activation == "none":  # the CLI writes probabilities
        logits = torch.softmax(torch.from_numpy(logits), 0).numpy() if model.out_ch > 1 else 1 / (1 + np.exp(-logits))
    expected = logits[0] if model.out_ch == 1 else logits.transpose(1, 2, 0)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "a_probs.npy"), expected, atol=1e-6)


def test_predict_takes_the_head_from_the_checkpoint_and_the_command_line_over_it(tmp_path, capsys, files):
    path, _ = files["folder-keras"]  # its config says out_activation="none"
    rgb = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    base = ("predict", "--no-progress", "--weights", path, tmp_path / "a.png", "--save-probs", "npy")
    assert command(capsys, *base, "--out", tmp_path / "o1")[0] == 0
    assert command(capsys, *base, "--out", tmp_path / "o2", "--out-activation", "sigmoid")[0] == 0
    # logits -> sigmoid in the CLI, or sigmoid in the model: the same probabilities
    np.testing.assert_allclose(np.load(tmp_path / "o1/a_probs.npy"), np.load(tmp_path / "o2/a_probs.npy"), atol=1e-6)


def test_an_ambiguous_checkpoint_asks_for_preset_and_loads_with_it(tmp_path, capsys):
    torch.save(classic_model(preset="milesial").state_dict(), tmp_path / "w.pt")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    args = ("predict", "--no-progress", "--weights", tmp_path / "w.pt", tmp_path / "a.png", "--out", tmp_path / "o")
    status, _, err = command(capsys, *args)
    assert status == 1 and "is ambiguous" in one_line(err) and "--preset milesial" in err
    assert command(capsys, *args, "--preset", "milesial")[0] == 0


# --------------------------------------------------------------------------- tune and bench
def _parse(*args) -> argparse.Namespace:
    return cli.build_parser().parse_args([str(a) for a in args])


@pytest.mark.parametrize("kind", list(KINDS))
def test_tune_builds_the_checkpoints_architecture(files, kind):
    path, expected = files[kind]
    model, described = cli.tune_model(_parse("tune", "--weights", path))
    assert_same_state(model, expected)
    assert described.startswith(f"UNet({model.in_ch}, {model.out_ch}")
    assert model.options == fastunet.load(path).options


def test_tune_without_weights_builds_the_preset_and_sizes_given():
    model, described = cli.tune_model(_parse("tune", "--preset", "keras", "--base-channels", "4", "--depth", "2"))
    assert model.options == fastunet.UNet(3, 1, preset="keras", base_channels=4, depth=2).options
    assert described == "UNet(3, 1, preset='keras', base_channels=4, depth=2)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_tune_checks_the_weights_path_then_says_it_needs_a_gpu(tmp_path, capsys, files):
    status, _, err = command(capsys, "tune", "--weights", tmp_path / "missing.pt")
    assert status == 2 and one_line(err).endswith("missing.pt: no such file or folder")
    status, _, err = command(capsys, "tune", "--weights", files["folder"][0])
    assert status == 2 and "needs an NVIDIA GPU" in one_line(err)


@pytest.fixture(scope="module")
def bench_run():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import run

    yield run
    sys.path.remove(str(Path(__file__).parents[1] / "benchmarks"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_bench_benchmarks_the_checkpoints_architecture_and_weights(files, bench_run, kind):
    path, expected = files[kind]
    args = bench_run.parse_args(["--weights", str(path), "--device", "cpu", "--quick", "--size", "32"])
    cfg, state = args.checkpoint
    model = fastunet.load(path)
    assert (args.in_ch, args.out_ch, args.base_channels, args.depth) == (
        model.in_ch, model.out_ch, model.base_channels, model.depth)  # fmt: skip
    built = fastunet.UNet(cfg.in_ch, cfg.out_ch, **cfg.options())
    assert built.options == model.options and cfg.preset == (model.preset or "classic")
    built.load_state_dict(state)
    assert_same_state(built, expected)  # every checkpoint here is float32: the masters are its bits


def test_bench_refuses_sizes_with_weights_and_reports_a_bad_checkpoint(tmp_path, files, bench_run, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(["--weights", str(files["pt"][0]), "--depth", "3", "--device", "cpu"])
    assert exc.value.code == 2 and "--depth: the sizes come from --weights" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(["--weights", str(tmp_path / "bad.pt"), "--device", "cpu"])
    assert exc.value.code == 1 and "is empty (0 bytes)" in one_line(capsys.readouterr().err)


@pytest.mark.slow  # a whole --quick benchmark run (~10-20 s on a loaded 2-core machine)
def test_bench_runs_with_a_milesial_checkpoint(tmp_path, files, bench_run, capsys):
    path, _ = files["milesial-bilinear"]
    status = bench_run.main(["--weights", str(path), "--device", "cpu", "--quick", "--size", "32", "--out",
                             str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "preset='milesial-bilinear'" in out and f"--weights {path}" in out
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["config"]["preset"] == "milesial-bilinear" and result["config"]["base_channels"] == 8
    assert all(r["status"] in ("ok", "skipped") for r in result["rows"])


# --------------------------------------------------------------------------- info
@pytest.mark.parametrize("kind", list(KINDS))
def test_info_says_what_each_checkpoint_is(capsys, files, kind):
    path, expected = files[kind]
    status, out, err = command(capsys, "info", path, "--json")
    assert status == 0 and err == ""
    report = json.loads(out)
    model = fastunet.load(path)
    assert report["format"] == fastunet.formats.read(path).format
    assert report["options"] == {"in_ch": model.in_ch, "out_ch": model.out_ch, **model.options}
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["dtype"] == "float32" and report["tensors"] == len(expected)
    has_bn = model.norm == "batch"
    assert report["batchnorm"]["statistics"] == ("present" if has_bn else "none")
    status, text, _ = command(capsys, "info", path)
    assert status == 0 and f"  model:       {report['model']}" in text
    if model.act == "relu":
        assert report["fused"]["eval"] == {"supported": True, "module": None, "reason": None}
        assert "  fused path:  inference supported" in text
    else:  # nnU-Net's LeakyReLU: the guard's reason, the eager path
        assert report["fused"]["eval"]["module"] == "conv1.conv.2" and "LeakyReLU" in report["fused"]["eval"]["reason"]
        assert "  fused path:  inference NOT supported (module 'conv1.conv.2' is a LeakyReLU" in text
    if model.norm == "instance":
        assert "  batchnorm:   none (InstanceNorm layers: each sample normalized by its own statistics" in text


def test_info_says_where_each_option_came_from_and_what_was_ignored(capsys, files):
    _, out, _ = command(capsys, "info", files["pt-state_dict"][0])
    assert "from the weights: in_ch=3, out_ch=1, base_channels=4, depth=2, upsampling='transpose'" in out
    assert "classic defaults: out_activation='sigmoid', act='relu', concat='up_skip'" in out
    assert "note:        the state_dict under 'state_dict'" in out and "ignored: epoch" in out
    _, out, _ = command(capsys, "info", files["milesial"][0])
    assert "format:      milesial Pytorch-UNet state_dict, torch.save file" in out
    assert "from the format: out_activation='none', act='relu', concat='skip_up'" in out


def test_info_reports_untrained_batchnorm_and_an_unsupported_fused_path(tmp_path, capsys, monkeypatch):
    fastunet.save_pretrained(fastunet.UNet(3, 1, base_channels=4, depth=2), tmp_path / "fresh")
    _, out, _ = command(capsys, "info", tmp_path / "fresh")
    assert "running statistics present but at their initial values (mean 0, var 1): never updated" in out
    from fastunet import guard

    verdict = guard.FusedSupport(False, "eval", "conv1.conv.0", "has a forward hook (the fused path never calls ...)")
    monkeypatch.setattr(guard, "check_fused_support", lambda model: verdict)
    _, out, _ = command(capsys, "info", tmp_path / "fresh")
    assert "inference NOT supported (module 'conv1.conv.0' has a forward hook" in out


# --------------------------------------------------------------------------- convert
@pytest.mark.parametrize("kind", list(KINDS))
def test_convert_writes_every_format_as_a_folder_bit_exact(tmp_path, capsys, files, kind):
    path, expected = files[kind]
    status, out, err = command(capsys, "convert", path, tmp_path / "saved")
    assert status == 0 and err == "" and "(pretrained)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary folder left
    loaded = fastunet.load(tmp_path / "saved")
    assert_same_state(loaded, expected)
    assert loaded.options == fastunet.load(path).options


@pytest.mark.parametrize("kind", [*KERAS_KINDS, "folder-keras"])
@pytest.mark.parametrize("name", ["back.weights.h5", "back.h5"])
def test_convert_to_keras_and_back_is_bit_exact(tmp_path, capsys, files, kind, name):
    path, expected = files[kind]
    assert command(capsys, "convert", path, tmp_path / "saved")[0] == 0
    status, _, err = command(capsys, "convert", tmp_path / "saved", tmp_path / name, "--to", "keras-h5")
    assert status == 0
    head = fastunet.load(path).out_activation
    if head != "sigmoid":  # the head is not in a Keras weights file: said, with how to load it back
        assert "does not record out_activation='none' (read back as 'sigmoid')" in one_line(err)
    back = fastunet.load(tmp_path / name, out_activation=head)
    assert_same_state(back, expected)
    assert back.options == fastunet.load(path).options


@pytest.mark.parametrize("kind", MILESIAL_KINDS)
@pytest.mark.parametrize("name", ["back.pth", "back.safetensors"])
def test_convert_to_milesial_and_back_is_bit_exact(tmp_path, capsys, files, kind, name):
    path, expected = files[kind]
    assert command(capsys, "convert", path, tmp_path / "saved")[0] == 0
    status, _, err = command(capsys, "convert", tmp_path / "saved", tmp_path / name, "--to", "milesial")
    assert status == 0 and err == ""
    assert_same_state(fastunet.load(tmp_path / name), expected)
    if name.endswith(".pth"):  # his own keys, as his model holds them
        theirs = milesial_model(kind == "milesial-bilinear").state_dict()
        written = torch.load(tmp_path / name, weights_only=True)
        assert list(written) == list(theirs) and all(torch.equal(written[k], theirs[k]) for k in theirs)


def test_convert_refuses_what_the_target_cannot_hold(tmp_path, capsys, files):
    status, _, err = command(capsys, "convert", files["pt"][0], tmp_path / "x.pth", "--to", "milesial")
    assert status == 1 and "cannot be written --to milesial: milesial's Pytorch-UNet has" in one_line(err)
    status, _, err = command(capsys, "convert", files["milesial"][0], tmp_path / "x.h5", "--to", "keras-h5")
    assert status == 1 and "this model has upsampling='transpose', norm='batch'" in one_line(err)
    assert sorted(os.listdir(tmp_path)) == []


def test_convert_never_writes_over_an_input_or_an_existing_output_without_overwrite(tmp_path, capsys, files):
    src, _ = files["pt"]
    before = src.read_bytes()
    status, _, err = command(capsys, "convert", src, src, "--to", "milesial", "--overwrite")
    assert status == 2 and "is the input" in one_line(err) and src.read_bytes() == before
    assert command(capsys, "convert", src, tmp_path / "saved")[0] == 0
    for overwrite in ((), ("--overwrite",)):  # the folder is its own input
        status, _, err = command(capsys, "convert", tmp_path / "saved", tmp_path / "saved", *overwrite)
        assert status == 2 and "is the input" in one_line(err) and "with --overwrite or not" in err
    weights = (tmp_path / "saved" / "model.safetensors").read_bytes()
    status, _, err = command(capsys, "convert", files["folder"][0], tmp_path / "saved")
    assert status == 2 and one_line(err).endswith("exists: pass --overwrite to replace it, or choose another DST")
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == weights
    assert command(capsys, "convert", files["milesial"][0], tmp_path / "saved", "--overwrite")[0] == 0
    assert fastunet.load(tmp_path / "saved").preset == "milesial"
    assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "model.safetensors"]


def test_convert_checks_the_destination_before_any_work(tmp_path, capsys, files, monkeypatch):
    import fastunet.formats

    monkeypatch.setattr(fastunet.formats, "read", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "file").write_text("x")
    cases = [
        (("convert", files["pt"][0], tmp_path / "file"), "is a file; a save_pretrained checkpoint is a folder"),
        (("convert", files["pt"][0], tmp_path / "w.bin", "--to", "milesial"), "--to milesial writes NAME.pth"),
        (("convert", files["pt"][0], tmp_path / "w.pth", "--to", "keras-h5"), "--to keras-h5 writes NAME.h5"),
        (("convert", tmp_path / "missing", tmp_path / "out"), "SRC " + str(tmp_path / "missing") + ": no such file"),
    ]
    for args, message in cases:
        status, _, err = command(capsys, *args)
        assert status == 2 and message in one_line(err)
    import fastunet.atomic as atomic

    def denied(folder, suffix):  # what a read-only folder does (root passes the permission bits)
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(atomic, "scratch_path", denied)
    status, _, err = command(capsys, "convert", files["pt"][0], tmp_path / "new" / "saved")
    assert status == 2 and one_line(err).endswith(
        f"DST's folder {tmp_path / 'new'} cannot be written: Permission denied"
    )


def test_an_interrupted_convert_leaves_nothing_under_the_final_name(tmp_path, capsys, files, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    status, _, err = command(capsys, "convert", files["pt"][0], tmp_path / "saved")
    assert status == 1 and "No space left on device" in one_line(err)
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary name
    status, _, err = command(capsys, "convert", files["milesial"][0], tmp_path / "m.safetensors", "--to", "milesial")
    assert status == 1 and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- hostile files
def _hostile(tmp_path: Path, kind: str) -> Path:
    good = tmp_path / "good.pt"
    torch.save(classic_model().state_dict(), good)
    path = tmp_path / f"{kind.replace(' ', '_')}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "pickled object":
        torch.save({"model": argparse.Namespace(layers=3)}, path)
    elif kind == "nan weights":
        sd = classic_model().state_dict()
        sd["conv2.conv.1.running_var"][0] = float("nan")
        torch.save(sd, path)
    elif kind == "too deep":
        torch.save(dict(classic_model().state_dict(), **{"conv23.conv.0.weight": torch.zeros(1, 1, 3, 3)}), path)
    elif kind == "truncated h5":
        path = tmp_path / "half.h5"
        data = (Path(__file__).parent / "data/keras_unet/unet.weights.h5").read_bytes()
        path.write_bytes(data[: len(data) // 3])
    return path


HOSTILE = {
    "empty": "is empty (0 bytes)",
    "truncated": "is truncated: it starts as a PyTorch zip archive",
    "pickled object": "holds Python objects other than tensors (argparse.Namespace)",
    "nan weights": "tensor 'conv2.conv.1.running_var' holds 1 NaN or Inf value(s)",
    "too deep": "depth (11) is over the limit depth=8",
    "truncated h5": "cannot be read as HDF5 (truncated or corrupt)",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_checkpoints_are_one_line_in_every_command(tmp_path, capsys, kind):
    path = _hostile(tmp_path, kind)
    with pytest.raises(fastunet.FastUNetError) as exc:
        fastunet.load(path)
    assert HOSTILE[kind] in str(exc.value) and "weights_only" not in str(exc.value)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    for args in (("info", path), ("convert", path, tmp_path / "out"),
                 ("predict", "--no-progress", "--weights", path, tmp_path / "a.png", "--out", tmp_path / "o")):  # fmt: skip
        status, _, err = command(capsys, *args)
        assert status == 1 and one_line(err) == f"fastunet {args[0]}: error: {exc.value}", args
    assert not (tmp_path / "out").exists()
    with pytest.raises(type(exc.value)):
        cli.main(["info", "--debug", str(path)])
    with pytest.raises(type(exc.value)):
        cli.main(["convert", "--debug", str(path), str(tmp_path / "out")])


def test_a_file_of_no_known_format_is_named_in_every_command(tmp_path, capsys):
    (tmp_path / "w.onnx").write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(64))
    for args in (("info", tmp_path / "w.onnx"), ("convert", tmp_path / "w.onnx", tmp_path / "out")):
        status, _, err = command(capsys, *args)
        assert status == 1 and "w.onnx is not a checkpoint fastunet reads" in one_line(err)
    with pytest.raises(CheckpointError):
        fastunet.load(tmp_path / "w.onnx")

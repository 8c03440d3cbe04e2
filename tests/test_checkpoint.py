"""Checkpoints: ``save_pretrained`` / ``from_pretrained`` / ``load_pretrained`` round trips, and the
errors for a directory that cannot load as it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import fastunet
from fastunet.checkpoint import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(base_channels=4, depth=2)


def _trained(cls=fastunet.UNet, **options) -> torch.nn.Module:
    """A tiny model whose BatchNorm buffers are not the defaults (one train-mode forward)."""
    model = cls(3, 2, **{**TINY, **options}).train()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8, dtype=model.head.weight.dtype))
        for p in model.parameters():  # and non-default parameters (BatchNorm weight/bias are 1/0)
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_round_trip_is_bitwise(tmp_path):
    model = _trained(out_activation="none")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = fastunet.UNet.from_pretrained(tmp_path)
    assert type(loaded) is fastunet.UNet and not loaded.training
    _assert_bitwise_equal(model.state_dict(), loaded.state_dict())
    # BatchNorm buffers travel too (running statistics moved by the train-mode forward)
    bn = loaded.conv1.conv[1]
    assert bn.num_batches_tracked.item() == 1 and bn.num_batches_tracked.dtype == torch.int64
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_config_records_the_architecture_and_versions(tmp_path):
    fastunet.save_pretrained(_trained(out_activation="softmax"), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config == {
        "format": "fastunet",
        "format_version": FORMAT_VERSION,
        "fastunet_version": fastunet.__version__,
        "class": "UNet",
        "in_ch": 3,
        "out_ch": 2,
        "base_channels": 4,
        "depth": 2,
        "out_activation": "softmax",
        "dtype": "float32",
    }
    assert fastunet.UNet.from_pretrained(tmp_path).out_activation == "softmax"


@pytest.mark.parametrize("save_cls", [fastunet.UNet, fastunet.UNetReference], ids=["from_UNet", "from_reference"])
@pytest.mark.parametrize("load_cls", [fastunet.UNet, fastunet.UNetReference], ids=["to_UNet", "to_reference"])
def test_either_class_loads_either(tmp_path, save_cls, load_cls):
    model = _trained(save_cls)
    fastunet.save_pretrained(model, tmp_path)
    loaded = fastunet.load_pretrained(tmp_path, cls=load_cls)
    assert type(loaded) is load_cls
    _assert_bitwise_equal(model.state_dict(), loaded.state_dict())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)  # folded vs module tree on CPU


def test_default_class_is_unet_and_dtype_is_kept(tmp_path):
    model = _trained().double()
    model.save_pretrained(tmp_path)
    loaded = fastunet.load_pretrained(tmp_path, map_location=torch.device("cpu"))
    assert type(loaded) is fastunet.UNet
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["dtype"] == "float64"
    _assert_bitwise_equal(model.state_dict(), loaded.state_dict())


def test_a_channels_last_model_saves(tmp_path):
    model = _trained().to(memory_format=torch.channels_last)
    model.save_pretrained(tmp_path / "nested" / "dir")  # parents are created
    _assert_bitwise_equal(model.state_dict(), fastunet.UNet.from_pretrained(tmp_path / "nested" / "dir").state_dict())


# ---------------------------------------------------------------------------- errors
def test_missing_directory_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json .*no such directory"):
        fastunet.UNet.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no config\.json .*save_pretrained"):
        fastunet.UNet.from_pretrained(tmp_path)


def test_missing_weights(tmp_path):
    _trained().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors next to config\.json"):
        fastunet.UNet.from_pretrained(tmp_path)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_future_format_version_is_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    _edit_config(tmp_path, format_version=FORMAT_VERSION + 1, fastunet_version="9.0.0")
    with pytest.raises(CheckpointError, match=r"format_version 2, written by fastunet 9\.0\.0.*upgrade fastunet"):
        fastunet.UNet.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"is not valid JSON"),
        ('{"format": "other"}', r"is not a fastunet config"),
        ('{"format": "fastunet", "format_version": "1"}', r"format_version must be a positive int"),
        ('{"format": "fastunet", "format_version": 1, "in_ch": 3}', r"lacks the architecture option\(s\) out_ch, "),
    ],
)
def test_malformed_config(tmp_path, text, message):
    _trained().save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        fastunet.UNet.from_pretrained(tmp_path)


def test_invalid_option_in_config(tmp_path):
    _trained().save_pretrained(tmp_path)
    _edit_config(tmp_path, out_activation="tanh")
    with pytest.raises(CheckpointError, match=r"config\.json: out_activation must be one of"):
        fastunet.UNet.from_pretrained(tmp_path)


def test_config_weights_mismatch_names_the_first_mis_shaped_tensor(tmp_path):
    _trained().save_pretrained(tmp_path)
    _edit_config(tmp_path, out_ch=3)  # the head no longer fits
    with pytest.raises(CheckpointError) as info:
        fastunet.UNet.from_pretrained(tmp_path)
    text = str(info.value)
    assert "does not fit config.json's UNet(3, 3, base_channels=4, depth=2)" in text
    assert "tensor 'conv6.weight' has shape [2, 4, 1, 1], the config's model needs [3, 4, 1, 1] (and 1 more)" in text


def test_config_weights_mismatch_names_missing_and_unexpected_tensors(tmp_path):
    _trained().save_pretrained(tmp_path)
    _edit_config(tmp_path, depth=3)  # a deeper model: other widths, more modules
    with pytest.raises(CheckpointError) as info:
        fastunet.UNet.from_pretrained(tmp_path)
    text = str(info.value)
    assert re.search(
        r"missing tensor 'up6\.weight' \(and \d+ more\); unexpected tensor '[\w.]+' \(and \d+ more\)", text
    )
    assert re.search(
        r"tensor 'conv4\.conv\.0\.weight' has shape \[8, 16, 3, 3\], the config's model needs \[32, 16, 3, 3\]", text
    )


def test_extra_and_missing_tensors_in_the_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    _trained().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    del state["conv2.conv.1.running_var"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError) as info:
        fastunet.UNet.from_pretrained(tmp_path)
    assert "missing tensor 'conv2.conv.1.running_var'; unexpected tensor 'extra.weight'" in str(info.value)


def test_corrupt_weights(tmp_path):
    _trained().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"cannot be read as safetensors"):
        fastunet.UNet.from_pretrained(tmp_path)


def test_wrong_class_or_model(tmp_path):
    with pytest.raises(TypeError, match="expected a fastunet.UNet or fastunet.UNetReference"):
        fastunet.save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    _trained().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="cls must be fastunet.UNet"):
        fastunet.load_pretrained(tmp_path, cls=torch.nn.Linear)


@pytest.mark.cuda
def test_map_location_cuda(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path)
    loaded = fastunet.UNet.from_pretrained(tmp_path, map_location="cuda")
    assert all(t.is_cuda for t in loaded.state_dict().values())
    _assert_bitwise_equal(model.state_dict(), {k: v.cpu() for k, v in loaded.state_dict().items()})


# ---------------------------------------------------------------------------- torch.load
def _sources():
    # What users run or copy: the package, the kernels, the benchmarks and the docs. (The tests
    # may exchange their own temporary files between processes as they see fit.)
    for pattern in ("fastunet/**/*.py", "kernels/**/*.py", "benchmarks/**/*.py", "*.md"):
        yield from ROOT.glob(pattern)


def test_every_torch_load_is_weights_only():
    """A pickle runs code when loaded: every ``torch.load`` in the package, the benchmarks and the
    docs says ``weights_only=True`` explicitly, so no torch default can turn that off."""
    offenders = []
    call = re.compile(r"torch\.load\(")
    for path in _sources():
        text = path.read_text(errors="replace")
        for m in call.finditer(text):
            depth, i = 1, m.end()
            while i < len(text) and depth:  # the call's argument text, to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            args = text[m.end() : i - 1]
            if "weights_only=True" not in args:
                offenders.append(f"{path.relative_to(ROOT)}: torch.load({args})")
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)


# ---------------------------------------------------------------------------- docs
def test_docs_checkpoint_block_runs(tmp_path):
    from test_readme import doc_blocks, run_block

    (block,) = doc_blocks("checkpoint")
    ns, _ = run_block(block, tmp_path)
    assert (tmp_path / "unet-ckpt" / CONFIG_NAME).is_file()
    assert (tmp_path / "unet-ckpt" / WEIGHTS_NAME).is_file()
    _assert_bitwise_equal(ns["model"].state_dict(), ns["loaded"].state_dict())

"""``fastunet.load``: every format detected from its content, the weights bit-exact, the
architecture from the weights and what the file records, the ``from_*`` API through the same
builder, the writers' files read back bit for bit, and one clear line for wrong, unknown and
ambiguous files. Checkpoints from tests/checkpoint_files.py (widths 4-8; the Keras ones are the
files real Keras wrote, width 2)."""

from __future__ import annotations

import io
import zipfile

import h5py
import numpy as np
import pytest
import torch
from checkpoint_files import KERAS_DATA, KINDS, classic_model, keras_expected, make, milesial_model, milesial_to_ours
from safetensors.torch import save_file

import fastunet
from fastunet import CheckpointError, LimitError
from fastunet.formats import read
from fastunet.writers import incompatibility, milesial_state_dict, save_keras_h5, save_milesial, unrecorded

FORMAT = {"folder": "pretrained", "folder-keras": "pretrained", "folder-nnunet": "pretrained",
          "milesial": "milesial", "milesial-bilinear": "milesial", "keras3": "keras", "keras3-archive": "keras",
          "tf-keras-model": "keras", "tf-keras-weights": "keras"}  # fmt: skip
PRESET = {"folder-keras": "keras", "folder-nnunet": "nnunet", "milesial": "milesial",
          "milesial-bilinear": "milesial-bilinear",
          **{k: "keras" for k in KINDS if k.startswith(("keras", "tf-keras"))}}  # fmt: skip


def assert_same_state(model: torch.nn.Module, expected: dict) -> None:
    """The model's state_dict is ``expected``: the same names, dtypes and bits."""
    got = model.state_dict()
    assert list(got) == list(expected) or sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_format_is_detected_and_loads_bit_exact(tmp_path, kind):
    path, expected = make(kind, tmp_path)
    ck = read(path)
    assert ck.format == FORMAT.get(kind, "classic")
    model = fastunet.load(path)
    assert type(model) is fastunet.UNet and not model.training
    assert model.preset == PRESET.get(kind, "classic")
    assert_same_state(model, expected)
    assert all(p.requires_grad for p in model.parameters())


def test_the_container_and_what_was_taken_off_are_reported(tmp_path):
    notes = {}
    for kind in ("pt-state_dict", "pt-module", "milesial"):
        (tmp_path / kind).mkdir()
        notes[kind] = read(make(kind, tmp_path / kind)[0])
    assert notes["pt-state_dict"].notes == ["the state_dict under 'state_dict'", "also in the file, ignored: epoch"]
    assert notes["pt-module"].notes == ["the 'module.' prefix (DataParallel) removed"]
    assert notes["milesial"].notes == ["milesial's 'mask_values' entry ignored"]
    assert read(make("keras3-archive", tmp_path)[0]).container == "Keras 3 .keras archive"
    assert read(make("tf-keras-model", tmp_path)[0]).container == "tf.keras .h5 model (model.save)"


def test_the_weights_determine_sizes_and_shapes_and_the_rest_comes_from_the_file(tmp_path):
    # A classic-keyed file of an architecture no preset has: everything else is the classic defaults.
    model = classic_model(norm="none", upsampling="nearest_conv", conv_bias=False, out_activation="none")
    torch.save(model.state_dict(), tmp_path / "own.pt")
    loaded = fastunet.load(tmp_path / "own.pt")
    assert {k: loaded.options[k] for k in ("upsampling", "norm", "conv_bias", "pre_head")} == {
        "upsampling": "nearest_conv", "norm": "none", "conv_bias": False, "pre_head": 0}  # fmt: skip
    assert loaded.out_activation == "sigmoid" and loaded.concat == "up_skip"  # not in the file: the defaults
    assert fastunet.load(tmp_path / "own.pt", out_activation="none").out_activation == "none"
    folder = tmp_path / "saved"
    fastunet.save_pretrained(model, folder)
    assert fastunet.load(folder).options == model.options  # a folder records them all


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_dtype_of_the_file_is_kept(tmp_path, dtype):
    model = classic_model().to(dtype)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "w.pt", tmp_path / "w.safetensors"):
        assert_same_state(fastunet.load(path), model.state_dict())


def test_the_from_api_goes_through_the_same_builder(tmp_path):
    path, expected = make("milesial-bilinear", tmp_path)
    a, b = fastunet.UNet.from_milesial(path), fastunet.load(path)
    assert a.options == b.options and a.preset == b.preset
    assert_same_state(a, expected)
    sd = milesial_model(bilinear=False).state_dict()
    model = fastunet.UNet.from_milesial(sd)
    assert_same_state(model, milesial_to_ours(sd))
    with torch.no_grad():  # an in-memory source is copied, never shared
        model.conv1.conv[0].weight.add_(1)
    assert not torch.equal(model.conv1.conv[0].weight, sd["inc.double_conv.0.weight"])
    keras = KERAS_DATA / "unet.weights.h5"
    assert_same_state(fastunet.UNet.from_keras(keras), keras_expected(keras))
    assert fastunet.UNet.from_keras(keras).options == fastunet.load(keras).options
    folder, expected = make("folder", tmp_path)
    assert_same_state(fastunet.UNet.from_pretrained(folder), expected)
    assert type(fastunet.load_pretrained(folder, cls=fastunet.UNetReference)) is fastunet.UNetReference


def test_options_over_the_file_are_checked_against_the_weights(tmp_path):
    path, _ = make("pt", tmp_path)
    with pytest.raises(CheckpointError, match=r"does not fit UNet\(4, 1, base_channels=4, depth=2\): tensor "
                       r"'conv1.conv.0.weight' has shape \[4, 3, 3, 3\], the model needs \[4, 4, 3, 3\]"):  # fmt: skip
        fastunet.load(path, in_ch=4)
    with pytest.raises(CheckpointError, match=r"conv_bias=False\): unexpected tensor 'conv1.conv.0.bias'"):
        fastunet.load(path, conv_bias=False)
    with pytest.raises(TypeError, match="unknown option.*colour"):
        fastunet.load(path, colour="red")
    with pytest.raises(ValueError, match="unknown preset 'unet3d'"):
        fastunet.load(path, preset="unet3d")


def test_a_preset_that_contradicts_the_weights_or_the_format_is_refused(tmp_path):
    path, _ = make("pt", tmp_path)
    with pytest.raises(CheckpointError, match=r"preset 'keras' has upsampling='nearest_conv', norm='none' but the "
                       r"weights in .*unet.pt have upsampling='transpose', norm='batch'"):  # fmt: skip
        fastunet.load(path, preset="keras")
    path, _ = make("milesial", tmp_path)
    with pytest.raises(CheckpointError, match=r"is a milesial checkpoint \(preset 'milesial'\); preset='keras' does"):
        fastunet.load(path, preset="keras")
    assert fastunet.load(path, preset="milesial").preset == "milesial"
    folder, _ = make("folder-keras", tmp_path)  # its config records out_activation="none"
    with pytest.raises(CheckpointError, match=r"preset 'keras' has out_activation='sigmoid' but .*config.json records "
                       r"out_activation='none': leave the preset out"):  # fmt: skip
        fastunet.load(folder, preset="keras")
    assert fastunet.load(folder, preset="keras", out_activation="none").out_activation == "none"
    assert fastunet.load(folder, preset="keras", out_activation="sigmoid").out_activation == "sigmoid"


@pytest.mark.parametrize("preset", ["milesial", "keras", "milesial-bilinear"])
def test_a_bare_state_dict_with_a_presets_shapes_is_ambiguous_until_told(tmp_path, preset):
    model = classic_model(preset=preset)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as info:
        fastunet.load(tmp_path / "w.pt")
    text = str(info.value)
    assert f"is ambiguous: a state_dict in fastunet's keys with upsampling={model.upsampling!r}" in text
    assert f"the shapes of preset {preset!r}" in text and "concat: 'skip_up' or 'up_skip'" in text
    assert f"Pass preset={preset!r} (--preset {preset})" in text and "\n" not in text
    loaded = fastunet.load(tmp_path / "w.pt", preset=preset)
    assert loaded.options == model.options
    assert_same_state(loaded, model.state_dict())
    given = fastunet.load(tmp_path / "w.pt", concat="skip_up", out_activation=model.out_activation)
    assert given.options == model.options


def test_a_state_dict_without_norm_tensors_is_ambiguous_once_two_norms_have_none(tmp_path, monkeypatch):
    from fastunet import formats

    assert formats._tensorless_norms() == ("none",)  # today: BatchNorm or nothing, told apart by the weights
    model = classic_model(norm="none")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert fastunet.load(tmp_path / "w.pt").norm == "none"
    monkeypatch.setattr(formats, "_tensorless_norms", lambda: ("none", "instance"))  # a parameter-free norm added
    with pytest.raises(CheckpointError, match=r"without norm tensors, so its norm may be any of 'none', 'instance'"):
        fastunet.load(tmp_path / "w.pt")
    assert fastunet.load(tmp_path / "w.pt", norm="none").norm == "none"


def test_an_nnunet_state_dict_shows_its_instance_norm_and_asks_for_what_no_weight_shows(tmp_path):
    model = classic_model(preset="nnunet")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert read(tmp_path / "w.pt").inferred["norm"] == "instance"  # weight and bias, no running statistics
    with pytest.raises(CheckpointError) as info:
        fastunet.load(tmp_path / "w.pt")
    text = str(info.value)
    assert "norm='instance'" in text and "the shapes of preset 'nnunet'" in text and "\n" not in text
    assert "act: 'leaky_relu' or 'relu'" in text and "Pass preset='nnunet' (--preset nnunet)" in text
    for kwargs in ({"preset": "nnunet"}, {"act": "leaky_relu", "out_activation": "none", "init": "he_normal"}):
        loaded = fastunet.load(tmp_path / "w.pt", **kwargs)
        assert loaded.options == model.options and loaded.preset == "nnunet"
        assert_same_state(loaded, model.state_dict())
    with pytest.raises(CheckpointError, match=r"preset 'classic' has norm='batch' but the weights in .* have "
                       r"norm='instance'"):  # fmt: skip
        fastunet.load(tmp_path / "w.pt", preset="classic")
    torch.save(classic_model().state_dict(), tmp_path / "bn.pt")
    with pytest.raises(CheckpointError, match=r"preset 'nnunet' has norm='instance' but the weights .* norm='batch'"):
        fastunet.load(tmp_path / "bn.pt", preset="nnunet")
    bn = {k: v for k, v in classic_model().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(bn, tmp_path / "old.pt")  # a BatchNorm saved without its counters is still BatchNorm
    assert read(tmp_path / "old.pt").inferred["norm"] == "batch"


def test_unknown_and_ambiguous_files_say_what_was_found_and_what_would_load(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError,
        match=r"neither fastunet's .* nor milesial's .*its first keys: \['fc.weight', "
        r"'fc.bias'\]. For another U-Net's module tree, build that model and use fastunet.accelerate",
    ):
        fastunet.load(tmp_path / "other.pt")  # fmt: skip
    both = {**classic_model().state_dict(), **milesial_model(False).state_dict()}
    torch.save(both, tmp_path / "both.pt")
    with pytest.raises(CheckpointError, match="holds both fastunet's keys .* and milesial's"):
        fastunet.load(tmp_path / "both.pt")
    sd = classic_model().state_dict()
    torch.save({"state_dict": sd, "model": sd}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"holds several state_dicts \(under 'state_dict', 'model'\)"):
        fastunet.load(tmp_path / "two.pt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in sd.items()}}, tmp_path / "lightning.ckpt")
    assert_same_state(fastunet.load(tmp_path / "lightning.ckpt"), sd)
    assert "the 'net.' prefix removed" in read(tmp_path / "lightning.ckpt").notes


def test_files_of_no_known_format_and_folders_without_a_config(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(CheckpointError, match=r"notes.txt is not a checkpoint fastunet reads \(it starts with "
                       r"b'not weig'\): fastunet reads a save_pretrained folder"):  # fmt: skip
        fastunet.load(tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as zf:
        zf.writestr("a.jpg", b"")
    with pytest.raises(CheckpointError, match=r"a zip archive but neither a PyTorch checkpoint .* holds \['a.jpg'\]"):
        fastunet.load(tmp_path / "photos.zip")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        fastunet.load(tmp_path / "empty.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.pt: no such file or folder"):
        fastunet.load(tmp_path / "missing.pt")
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"run is a folder without config.json, .* and no weights file"):
        fastunet.load(folder)
    torch.save(classic_model().state_dict(), folder / "best.pth")
    with pytest.raises(CheckpointError, match=r"it holds best.pth: pass the file itself \(e.g. .*run/best.pth\)"):
        fastunet.load(folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):  # the folder API keeps its own answer
        fastunet.UNet.from_pretrained(folder)


def test_sizes_are_bounded_before_anything_is_allocated(tmp_path, monkeypatch):
    sd = dict(classic_model().state_dict(), **{"conv23.conv.0.weight": torch.zeros(1, 1, 3, 3)})
    torch.save(sd, tmp_path / "deep.pt")
    with pytest.raises(LimitError, match=r"depth \(11\) is over the limit depth=8"):
        fastunet.load(tmp_path / "deep.pt")
    monkeypatch.setenv("FASTUNET_LIMITS", "depth=11")
    with pytest.raises(CheckpointError, match=r"has no head tensor 'conv24.weight' \(the 1x1 output conv of the "
                       r"depth-11 U-Net its deepest key implies\)"):  # fmt: skip
        fastunet.load(tmp_path / "deep.pt")


# --------------------------------------------------------------------------- the writers
@pytest.mark.parametrize("fixture", ["unet.weights.h5", "unet_weights_legacy.h5"])
def test_the_keras_writer_writes_what_keras_wrote(tmp_path, fixture):
    """Read a file real Keras wrote, write it back: the same HDF5 tree, the same arrays."""
    model = fastunet.load(KERAS_DATA / fixture)
    out = save_keras_h5(model, tmp_path / fixture)
    with h5py.File(KERAS_DATA / fixture) as theirs, h5py.File(out) as ours:
        names, mine = [], []
        theirs.visit(names.append)
        ours.visit(mine.append)
        assert mine == names
        for name in names:
            if isinstance(theirs[name], h5py.Dataset):
                assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name][()], theirs[name][()])
        if "layer_names" in theirs.attrs:
            assert list(ours.attrs["layer_names"]) == list(theirs.attrs["layer_names"])
    assert_same_state(fastunet.load(out), keras_expected(KERAS_DATA / fixture))


def test_the_milesial_writer_reads_back_bit_exact_and_is_what_his_model_loads(tmp_path):
    from milesial_unet import MilesialUNet

    for bilinear in (False, True):
        theirs = milesial_model(bilinear)
        model = fastunet.load(make("milesial-bilinear" if bilinear else "milesial", tmp_path)[0])
        for name in ("m.pth", "m.safetensors"):
            save_milesial(model, tmp_path / name)
            assert_same_state(fastunet.load(tmp_path / name), model.state_dict())
        fresh = MilesialUNet(3, 2, bilinear=bilinear, base=8)
        fresh.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))  # strict: his own keys
        assert all(
            torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), theirs.state_dict().values(), strict=True)
        )
    assert list(milesial_state_dict(model))[:2] == ["inc.double_conv.0.weight", "inc.double_conv.1.weight"]


def test_what_a_format_cannot_hold_is_said(tmp_path):
    classic = classic_model()
    assert incompatibility(classic, "keras-h5") == (
        "zhixuhao's Keras unet() has upsampling='nearest_conv', norm='none', act='relu', concat='skip_up'; this "
        "model has upsampling='transpose', norm='batch', concat='up_skip'"
    )
    assert "this model has concat='up_skip'" in incompatibility(classic, "milesial")
    nnunet = classic_model(preset="nnunet")  # their code has ReLU: a LeakyReLU model is not their network
    assert incompatibility(nnunet, "milesial").endswith(
        "this model has norm='instance', act='leaky_relu', concat='up_skip'"
    )
    keras = classic_model(preset="keras", out_activation="none")
    assert incompatibility(keras, "keras-h5") is None
    assert unrecorded(keras, "keras-h5") == ["out_activation='none' (read back as 'sigmoid')"]
    with pytest.raises(ValueError, match="cannot write a Keras file"):
        save_keras_h5(classic, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_a_keras_archive_inside_a_zip_is_found_by_content_not_suffix(tmp_path):
    buf = io.BytesIO((KERAS_DATA / "unet.weights.h5").read_bytes())
    with zipfile.ZipFile(tmp_path / "model.zip", "w") as zf:
        zf.writestr("model.weights.h5", buf.getvalue())
    assert read(tmp_path / "model.zip").format == "keras"
    (tmp_path / "weights.bin").write_bytes((KERAS_DATA / "unet_full.h5").read_bytes())
    assert read(tmp_path / "weights.bin").container == "tf.keras .h5 model (model.save)"


def test_docs_load_block_runs(tmp_path):
    from test_readme import doc_blocks, run_block

    (code,) = doc_blocks("load")
    ns, _ = run_block(code, tmp_path)
    assert ns["model"].preset == "milesial"
    with pytest.raises(CheckpointError, match="ambiguous"):
        fastunet.load(tmp_path / "unet.pt")

"""The training BatchNorm's forward finalize in one launch (``bn_train_fold_``: the affine fold
and the running-statistics update), against ``torch.nn.BatchNorm2d`` in float64 on fresh data.

The batch statistics handed in are those of a float64 batch rounded to float32 (what the training
conv's epilogue and ``bn_stats_finalize`` deliver); the reference is a float64 ``BatchNorm2d``
run on the batch itself, so the tolerance covers the statistics' float32 rounding and the
kernel's arithmetic.
"""

import copy

import pytest
import torch
from fastunet.kernels import _common
from fastunet.kernels import bn_train as bn_train_kernels
from helpers import assert_close

import fastunet.ops as ops
from fastunet import kernels

NAN = float("nan")


class _Poisoned:
    """While active, the fp64 vectors the launcher allocates start as NaN, so a channel the kernel
    does not write shows up."""

    def __enter__(self):
        self._empty, self._empty_like = torch.empty, torch.empty_like

        def empty(*args, **kwargs):
            return self._empty(*args, **kwargs).fill_(NAN)

        def empty_like(*args, **kwargs):
            return self._empty_like(*args, **kwargs).fill_(NAN)

        torch.empty, torch.empty_like = empty, empty_like

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self._empty, self._empty_like


def _batch(n, c, h, w, device):
    """A float64 batch with per-channel means and spreads far from 0 and 1."""
    x = torch.randn(n, c, h, w, dtype=torch.float64, device=device)
    return (
        x * (torch.rand(c, device=device, dtype=torch.float64) * 3 + 0.1).view(1, -1, 1, 1)
        + torch.randn(c, device=device, dtype=torch.float64).view(1, -1, 1, 1) * 5
    )


def _stats(x):
    """The float32 batch statistics the training conv hands over."""
    return x.mean((0, 2, 3)).float(), x.var((0, 2, 3), unbiased=False).float()


def _fresh_bn(c, momentum, affine, track, device):
    """A float64 reference BatchNorm2d with random parameters and running statistics, and the
    float32 copies of its state the kernel updates."""
    bn = torch.nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track).double().to(device)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.randn(c, device=device))
            bn.bias.copy_(torch.randn(c, device=device))
        if track:
            bn.running_mean.copy_(torch.randn(c, device=device))
            bn.running_var.copy_(torch.rand(c, device=device) + 0.5)
            bn.num_batches_tracked.fill_(3)
    return bn


def _fold(bn, mean, var, count, **kwargs):
    """``kernels.bn_train_fold_`` with ``bn``'s float32 parameters and the buffers given."""
    w = bn.weight.detach().float() if bn.affine else None
    b = bn.bias.detach().float() if bn.affine else None
    return kernels.bn_train_fold_(mean, var, w, b, bn.eps, *kwargs.pop("buffers"), bn.momentum, count, **kwargs)


def _buffers(bn):
    if not bn.track_running_stats:
        return [None, None, None]
    return [bn.running_mean.float().clone(), bn.running_var.float().clone(), bn.num_batches_tracked.clone()]


@pytest.mark.parametrize("momentum", [0.1, 0.7, None], ids=["m0.1", "m0.7", "cumulative"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("c", [5, 300])  # 300: two channel blocks, the second ragged
def test_fold_matches_batchnorm2d(device, momentum, affine, track, c):
    """Two training steps: scale/shift normalize like the module's forward, and the running
    statistics and num_batches_tracked follow its update (unbiased variance, momentum or the
    cumulative average)."""
    bn = _fresh_bn(c, momentum, affine, track, device)
    buffers = _buffers(bn)
    for step in range(2):
        x = _batch(2, c, 3, 2 + step, device)
        mean, var = _stats(x)
        with _Poisoned():
            scale, shift = _fold(bn, mean, var, x.numel() // c, buffers=buffers)
        assert scale.dtype == shift.dtype == torch.float64
        expected = bn.train()(x)  # updates bn's buffers
        got = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        assert_close(got, expected, "fp32", f"normalized, step {step}")
        if track:
            assert_close(buffers[0], bn.running_mean, "fp32", f"running_mean, step {step}")
            assert_close(buffers[1], bn.running_var, "fp32", f"running_var, step {step}")
            assert torch.equal(buffers[2], bn.num_batches_tracked)


def test_nan_statistics_propagate(device):
    """A NaN channel (a NaN activation upstream): torch's BatchNorm makes that channel's output
    and running statistics NaN and leaves the others alone; so must the fold."""
    c = 7
    bn = _fresh_bn(c, 0.1, True, True, device)
    x = _batch(2, c, 3, 3, device)
    x[1, 4, 2, 0] = NAN
    mean, var = _stats(x)
    buffers = _buffers(bn)
    scale, shift = _fold(bn, mean, var, x.numel() // c, buffers=buffers)
    expected = bn.train()(x)
    got = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert got[:, 4].isnan().all() and expected[:, 4].isnan().all()
    keep = [i for i in range(c) if i != 4]
    assert_close(got[:, keep], expected[:, keep], "fp32", "the other channels")
    for ours, theirs in ((buffers[0], bn.running_mean), (buffers[1], bn.running_var)):
        assert ours[4].isnan() and theirs[4].isnan()
        assert_close(ours[keep], theirs[keep], "fp32", "running statistics of the other channels")


def test_one_value_per_channel_is_refused_as_torch_does(device):
    """torch refuses a training BatchNorm over one value per channel (its unbiased variance
    would divide by zero); the launcher and the op refuse the host count 1 the same way."""
    bn = _fresh_bn(3, 0.1, True, True, device)
    x = _batch(1, 3, 1, 1, device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn.train()(x)
    mean, var = _stats(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _fold(bn, mean, var, 1, buffers=_buffers(bn))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.bn_train_fold_(mean.double(), var.double(), None, None, 1e-5, *_buffers(bn)[:2], None, 0.1, 1)
    # without running statistics nothing divides by n - 1: the affine alone is fine
    scale, _ = _fold(bn, mean, var, 1, buffers=[None, None, None])
    assert scale.isfinite().all()


def _unbiased_update(rm, rv, mean, var, momentum, n):
    """torch's update in float64, n any size."""
    n = torch.tensor(float(n), dtype=torch.float64)
    f = momentum
    return rm.double() * (1 - f) + mean.double() * f, rv.double() * (1 - f) + var.double() * (n / (n - 1)) * f


@pytest.mark.parametrize("count", [2, 37, 2**31 + 3, 2**40 + 1])
def test_count_of_any_size(device, count):
    """The count reaches the kernel as an integer (i64 past 2^31) and n/(n-1) is formed in
    float64: at n = 2^40 + 1 the correction 1 + 2^-40 is below float32's resolution but the
    update still equals torch's float64 formula rounded once."""
    c = 9
    bn = _fresh_bn(c, 0.5, True, True, device)
    mean, var = torch.randn(c, device=device), torch.rand(c, device=device) * 1e6 + 1e6
    buffers = _buffers(bn)
    _fold(bn, mean, var, count, buffers=buffers)
    rm, rv = _unbiased_update(bn.running_mean, bn.running_var, mean, var, 0.5, count)
    assert_close(buffers[0], rm, "fp32", "running_mean")
    assert_close(buffers[1], rv, "fp32", "running_var")
    assert buffers[2].item() == 4


@pytest.mark.parametrize("n", [37.0, 2.0**33 + 1, 1.0])
def test_count_on_the_device(device, n):
    """A synchronised BatchNorm's global count as a float64 tensor: the same update as the host
    count; n = 1 gives torch's infinite correction (no host check can see it) in the kernel and
    the composite alike."""
    c = 6
    bn = _fresh_bn(c, 0.1, True, True, device)
    mean, var = torch.randn(c, device=device), torch.rand(c, device=device) + 0.1
    buffers, composite = _buffers(bn), _buffers(bn)
    count_all = torch.tensor([n], dtype=torch.float64, device=device)
    _fold(bn, mean, var, 0, buffers=buffers, count_all=count_all)
    w, b = bn.weight.detach().float(), bn.bias.detach().float()
    ops.bn_train_fold_(mean.double(), var.double(), w.double(), b.double(), bn.eps, *composite, 0.1, 0, count_all)
    rm, rv = _unbiased_update(bn.running_mean, bn.running_var, mean, var, 0.1, n)
    assert_close(buffers[0], rm, "fp32", "running_mean")
    assert_close(composite[0], rm, "fp32", "running_mean, composite")
    if n == 1.0:
        assert rv.isinf().all() and buffers[1].isinf().all() and composite[1].isinf().all()
    else:
        assert_close(buffers[1], rv, "fp32", "running_var")
        assert_close(composite[1], rv, "fp32", "running_var, composite")


def test_fold_equals_the_two_kernels_it_replaces(device):
    """``bn_train_fold_`` == ``bn_running_update_`` then ``bn_affine``, bit for bit (one kernel,
    the halves switched off: the per-op path and the tape give the same numbers)."""
    c = 40
    bn = _fresh_bn(c, None, True, True, device)
    mean, var = torch.randn(c, device=device), torch.rand(c, device=device)
    one, two = _buffers(bn), _buffers(bn)
    w, b = bn.weight.detach().float(), bn.bias.detach().float()
    fused = kernels.bn_train_fold_(mean, var, w, b, bn.eps, *one, None, 50)
    kernels.bn_running_update_(mean, var, *two, None, 50)
    apart = kernels.bn_affine(mean, var, w, b, bn.eps)
    for x, y in zip((*fused, *one), (*apart, *two), strict=True):
        assert torch.equal(x, y)


def test_one_launch(device):
    """The fold is one launch of one program, whatever the channel count."""
    c = 700
    mean, var = torch.randn(c, device=device), torch.rand(c, device=device)
    state = [torch.zeros(c, device=device), torch.ones(c, device=device), torch.tensor(0, device=device)]
    with _common.recording_launches() as launches:
        kernels.bn_train_fold_(mean, var, None, None, 1e-5, *state, 0.1, 10)
    assert [(fn, grid) for fn, grid, *_ in launches] == [(bn_train_kernels._bn_fold_kernel, (1,))]


def test_bad_arguments(device):
    c = 4
    mean, var = torch.randn(c, device=device), torch.rand(c, device=device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    nbt = torch.tensor(0, device=device)
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        kernels.bn_train_fold_(mean, var, None, None, 1e-5, rm, rv, None, None, 10)
    with pytest.raises(ValueError, match="int64 or int32"):
        kernels.bn_train_fold_(mean, var, None, None, 1e-5, rm, rv, nbt.double(), 0.1, 10)
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        kernels.bn_train_fold_(mean, var, None, None, 1e-5, rm, None, nbt, 0.1, 10)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.bn_train_fold_(mean, var, None, None, 1e-5, torch.zeros(2 * c, device=device)[::2], rv, nbt, 0.1, 10)
    with pytest.raises(ValueError, match=r"weight must be \[4\]"):
        kernels.bn_train_fold_(mean, var, torch.ones(3, device=device), None, 1e-5, rm, rv, nbt, 0.1, 10)
    with pytest.raises(ValueError, match="count_all must be a one-element float64"):
        kernels.bn_train_fold_(mean, var, None, None, 1e-5, rm, rv, nbt, 0.1, 0, count_all=torch.ones(1))


# ------------------------------------------------------------------ the op layer
def _op_args(device, c=12, dtype=torch.float32, grad=False):
    mean = torch.randn(c, device=device, dtype=dtype, requires_grad=grad)
    var = (torch.rand(c, device=device, dtype=dtype) + 0.1).requires_grad_(grad)
    w = torch.randn(c, device=device, dtype=dtype, requires_grad=grad)
    b = torch.randn(c, device=device, dtype=dtype, requires_grad=grad)
    state = [torch.randn(c, device=device), torch.rand(c, device=device) + 0.5, torch.tensor(2, device=device)]
    return (mean, var, w, b, 1e-5), state


def test_opcheck(device):
    """Schema (the buffers' mutation declared), fake implementation and the compiled path, on
    the kernel (float32) and the composite (float64)."""
    for dtype in (torch.float32, torch.float64):
        head, state = _op_args(device, dtype=dtype)
        for momentum in (0.1, None):
            torch.library.opcheck(torch.ops.fastunet.bn_train_fold_.default, (*head, *state, momentum, 30, None))
        count_all = torch.tensor([30.0], dtype=torch.float64, device=device)
        torch.library.opcheck(torch.ops.fastunet.bn_train_fold_.default, (*head, *state, 0.1, 0, count_all))
        torch.library.opcheck(torch.ops.fastunet.bn_train_fold_.default, (*head, None, None, None, 0.1, 30, None))


def _reference_grads(head, gscale, gshift):
    """Gradients of (scale, shift) in float64 by autograd of the definition."""
    leaves = [t.detach().double().requires_grad_() for t in head[:4]]
    mean, var, w, b = leaves
    scale = w / torch.sqrt(var + head[4])
    shift = b - mean * scale
    torch.autograd.backward((scale, shift), (gscale, gshift))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("calls", ["autograd", "tape-scale", "tape-shift"])
def test_bn_train_fold_gradients_and_update(device, calls):
    """The composite under autograd (the per-op path: update and affine as two registered ops)
    and on the training tape (one launch, the affine's formula recorded; the tape's output is
    one of the op's outputs): the same buffers, and the gradients of autograd on the definition."""
    head, state = _op_args(device, grad=True)
    reference = copy.deepcopy(state)
    gscale = torch.randn(12, dtype=torch.float64, device=device)
    gshift = torch.randn(12, dtype=torch.float64, device=device)
    if calls == "autograd":
        scale, shift = ops.DISPATCH.bn_train_fold(*head, *state, 0.1, 30)
        torch.autograd.backward((scale, shift), (gscale, gshift))
    else:
        which = calls == "tape-shift"
        (gscale, gshift)[1 - which].zero_()
        out = ops.run_taped(lambda tape: tape.bn_train_fold(*head, *state, 0.1, 30)[which], head[:4])
        out.backward((gscale, gshift)[which])
    grads = [t.grad for t in head[:4]]
    ops.bn_running_update_(head[0].detach(), head[1].detach(), *reference, 0.1, 30)
    for a, b in zip(state, reference, strict=True):
        assert torch.equal(a, b)
    for got, want, name in zip(grads, _reference_grads(head, gscale, gshift), ("mean", "var", "w", "b"), strict=True):
        assert_close(got, want, "fp32", f"d/d{name}")


def test_bn_train_fold_launches_once_without_autograd(device, monkeypatch):
    """Where autograd does not record (here: no grad; the tape's forward runs without grad too),
    ``bn_train_fold`` is the one fused op, called without the dispatcher."""
    seen = []
    for name in ("bn_train_fold_", "bn_running_update_", "bn_affine"):
        impl = getattr(ops.DIRECT, name)
        monkeypatch.setattr(
            type(ops.DIRECT), name, staticmethod(lambda *a, _n=name, _i=impl: seen.append(_n) or _i(*a))
        )
    head, state = _op_args(device, grad=True)
    with torch.no_grad():
        ops.DIRECT.bn_train_fold(*head, *state, 0.1, 30)
    assert seen == ["bn_train_fold_"]
    assert state[2].item() == 3


def test_training_step_folds_each_batchnorm_in_one_launch(monkeypatch, tmp_path):
    """A training step of the classic structure (launches recorded on a simulated H100, nothing
    run): each BatchNorm's finalize is one launch of the fold with both halves on, nothing else
    of this module's forward kernels, and the buffers' update is in it."""
    import fastunet

    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path))  # simulated timings stay out of the real cache
    model = fastunet.UNet(3, 1, base_channels=4).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = fastunet.get_backend()
    fastunet.set_backend("triton")
    gpu = _common.SimulatedGPU()
    fastunet.kernels._tuning.clear_memory()
    try:
        with _common.simulate_gpu(gpu):
            model(torch.randn(1, 3, 32, 32)).sum().backward()
    finally:
        fastunet.set_backend(before)
        fastunet.kernels._tuning.clear_memory()
    folds = [meta for fn, _, _, meta in gpu.launches if fn is bn_train_kernels._bn_fold_kernel]
    assert len(folds) == len(bns) == 18
    assert all(meta["AFFINE"] and meta["HAS_RUNNING"] and meta["HAS_NBT"] for meta in folds)

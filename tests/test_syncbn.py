"""``nn.SyncBatchNorm`` and ``DistributedDataParallel`` on the fused training path.

Several ranks run as processes (``tests/_syncbn_worker.py``: gloo on CPU, the kernels in
Triton's interpreter). torch's own ``nn.SyncBatchNorm`` refuses CPU tensors and DDP refuses
SyncBatchNorm on CPU, so the truth is a single-process float64 ``UNetReference`` with
``BatchNorm2d`` on the whole concatenated batch, its loss divided by the number of ranks, which
is what each rank's gradients averaged over the ranks (as DDP does; by hand here) must equal.
float64 runs the ops' composites (``fp64`` tolerance), float32 the kernels (``fp32``).

In one process: a SyncBatchNorm without a process group to synchronise over (not initialised,
or one rank) is a BatchNorm2d, the running update with a device-side count, the fp64 merge's
numerics. Ring 3: DDP on one GPU with NCCL.
"""

from __future__ import annotations

import copy
import datetime
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import HAS_CUDA, assert_close, max_rel_error, randomize_batchnorm, tolerance_name
from test_training import NARROW, assert_same_training_step, train_pair
from torch import nn

import fastunet
from fastunet.distributed import merge_stats

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("triton_backend")]

WORKER = Path(__file__).with_name("_syncbn_worker.py")
RANK_TIMEOUT_S = 600  # a hung collective must fail the test, not the suite


# ------------------------------------------------------------------ several ranks
def run_ranks(tmp_path: Path, spec: dict, world: int = 2) -> list[dict]:
    """Run ``world`` worker processes on ``spec`` and return each rank's results."""
    spec = dict(spec, world=world, init=f"file://{tmp_path / 'rendezvous'}")
    path = tmp_path / "spec.pt"
    torch.save(spec, path)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    procs, logs = [], []
    for rank in range(world):
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        cmd = [sys.executable, str(WORKER), str(path), str(rank)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        codes = [p.wait(timeout=RANK_TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if codes is None or any(codes):
        tails = "\n".join(f"--- rank {r}:\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(world))
        raise AssertionError(f"worker exit codes {codes}\n{tails}")
    return [torch.load(f"{path}.rank{r}.pt", weights_only=False) for r in range(world)]


def make_spec(
    dtype, batches, *, steps=2, size=16, mode="sync", compile=False, static_graph=False, groups=None, seed=0
):
    """A run of ``steps`` SGD steps; rank r gets ``batches[r]`` images of each step's batch.
    Weights, inputs and output weights are float32 values, so every dtype sees the same ones."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_batchnorm(fastunet.UNetReference(3, 1, **NARROW))
    n = sum(batches)
    bounds = [0]
    for b in batches:
        bounds.append(bounds[-1] + b)
    return {
        "mode": mode,
        "dtype": dtype,
        "options": NARROW,
        "state": model.state_dict(),
        "xs": [torch.randn(n, 3, size, size, generator=gen) for _ in range(steps)],
        "gs": [torch.randn(n, 1, size, size, generator=gen) for _ in range(steps)],
        "bounds": bounds,
        "lr": 0.1,
        "compile": compile,
        "static_graph": static_graph,
        "groups": groups,
    }


def reference_run(spec: dict, world: int, parts=None) -> list[dict]:
    """float64 ``UNetReference`` runs of the spec's steps, one per part of the batch (``parts``:
    (start, stop) slices; default: the whole batch, one BatchNorm2d over all ranks' images).
    Gradients: of the summed loss over the parts divided by ``world``, as DDP averages; every
    part's model takes the same SGD steps. Returns per part what a worker returns."""
    parts = parts or [(0, spec["bounds"][-1])]
    refs = []
    for _ in parts:
        ref = fastunet.UNetReference(3, 1, **spec["options"])
        ref.load_state_dict(spec["state"])
        refs.append(ref.double().train())
    opts = [torch.optim.SGD(r.parameters(), lr=spec["lr"], momentum=0.9) for r in refs]
    results = [{"steps": []} for _ in parts]
    for x, g in zip(spec["xs"], spec["gs"], strict=True):
        summed = None
        for ref, opt, (start, stop), res in zip(refs, opts, parts, results, strict=True):
            xr = x[start:stop].double().requires_grad_()
            opt.zero_grad()
            y = ref(xr)
            ((y * g[start:stop].double()).sum() / world).backward()
            grads = [p.grad.clone() for p in ref.parameters()]
            summed = grads if summed is None else [a + b for a, b in zip(summed, grads, strict=True)]
            res["steps"].append({"y": y.detach(), "x_grad": xr.grad * world})
        for ref, opt, res in zip(refs, opts, results, strict=True):
            for p, s in zip(ref.parameters(), summed, strict=True):
                p.grad = s.clone()
            res["steps"][-1]["grads"] = summed
            opt.step()
    for ref, res in zip(refs, results, strict=True):
        res["params"] = [p.detach() for p in ref.parameters()]
        res["buffers"] = list(ref.buffers())
    return results


def compare(got: dict, want: dict, tol: str, rows: slice, what: str) -> dict:
    """Every step's output, input gradient and parameter gradients, then the parameters and
    buffers, of one rank (``rows`` of the reference's batch). Returns the worst relative errors."""
    errors = {"forward": 0.0, "input grad": 0.0, "grads": 0.0, "params": 0.0, "running stats": 0.0}
    for i, (g_step, w_step) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        y, x_grad = w_step["y"][rows], w_step["x_grad"][rows]
        assert_close(g_step["y"], y, tol, f"{what} step {i}: output")
        assert_close(g_step["x_grad"], x_grad, tol, f"{what} step {i}: input grad")
        if y.numel():
            errors["forward"] = max(errors["forward"], max_rel_error(g_step["y"], y))
            errors["input grad"] = max(errors["input grad"], max_rel_error(g_step["x_grad"], x_grad))
        # Conv biases in front of a BatchNorm have mathematically zero gradients: hold them to
        # the scale of the largest gradient, as tests/test_training.py does.
        scale = max(p.pow(2).mean().sqrt().item() for p in w_step["grads"])
        for j, (a, e) in enumerate(zip(g_step["grads"], w_step["grads"], strict=True)):
            assert_close(a, e, tol, f"{what} step {i}: grad of parameter {j}", scale=scale)
            errors["grads"] = max(errors["grads"], (a - e).abs().max().item() / scale)
    for j, (a, e) in enumerate(zip(got["params"], want["params"], strict=True)):
        assert_close(a, e, tol, f"{what}: parameter {j} after the steps")
        errors["params"] = max(errors["params"], max_rel_error(a, e))
    for j, (a, e) in enumerate(zip(got["buffers"], want["buffers"], strict=True)):
        if e.is_floating_point():
            assert_close(a, e, tol, f"{what}: buffer {j} after the steps", scale=1.0)
            errors["running stats"] = max(errors["running stats"], max_rel_error(a, e))
        else:
            assert torch.equal(a, e), f"{what}: buffer {j}"
    return errors


def assert_ranks_agree(results: list[dict]) -> None:
    """Every rank normalized with the same global statistics and stepped with the same averaged
    gradients: parameters and running statistics bit-identical across ranks."""
    first = results[0]
    for r, res in enumerate(results[1:], 1):
        for a, b in zip(first["params"] + first["buffers"], res["params"] + res["buffers"], strict=True):
            assert torch.equal(a, b), f"rank {r} differs from rank 0"


def check_sync_run(tmp_path, dtype, batches, **options) -> list[dict]:
    spec = make_spec(dtype, batches, **options)
    world = len(batches)
    results = run_ranks(tmp_path, spec, world)
    (want,) = reference_run(spec, world)
    tol = "fp64" if dtype == torch.float64 else tolerance_name(dtype)
    errors = []
    for r, res in enumerate(results):
        assert res["supported"]
        rows = slice(spec["bounds"][r], spec["bounds"][r + 1])
        errors.append(compare(res, want, tol, rows, f"rank {r} of {batches}"))
    assert_ranks_agree(results)
    worst = {k: max(e[k] for e in errors) for k in errors[0]}
    print(f"\n{dtype} batches {batches}: worst relative errors vs float64 BatchNorm2d on the whole batch: {worst}")
    return results


def test_two_ranks_uneven_batches_float64(tmp_path):
    """Batches of 3 and 1: outputs, input and parameter gradients, running statistics and
    parameters after 2 SGD steps equal BatchNorm2d on the concatenated 4 images (composites)."""
    check_sync_run(tmp_path, torch.float64, [3, 1])


@pytest.mark.slow  # two rank processes (~8 s); quick mode keeps the uneven 3+1 run
def test_two_ranks_one_empty_float64(tmp_path):
    """A rank with no images takes part in every collective with a zero count."""
    results = check_sync_run(tmp_path, torch.float64, [2, 0])
    assert results[1]["steps"][0]["y"].shape[0] == 0


@pytest.mark.slow  # quick mode keeps the uneven and empty batches; this is one more pair of ranks (~12 s)
def test_two_ranks_one_value_each_at_the_bottleneck(tmp_path):
    """4x4 images, depth 2: one value per channel per rank at the bottleneck, which a single
    rank's BatchNorm would refuse; the group holds two, as BatchNorm2d on both images does."""
    check_sync_run(tmp_path, torch.float64, [1, 1], size=4, steps=1)


@pytest.mark.slow  # two rank processes
def test_too_few_values_across_the_group_raise_on_every_rank(tmp_path):
    """One value per channel in the whole group: every rank raises BatchNorm's error (none is
    left waiting in a collective)."""
    spec = make_spec(torch.float64, [1, 0], size=4, steps=1, mode="error")
    for res in run_ranks(tmp_path, spec):
        assert "more than 1 value per channel" in res.get("error", ""), res


@pytest.mark.slow  # three processes on a 2-core machine: ~17 s
def test_process_group_attribute_is_honoured(tmp_path):
    """Three ranks, SyncBatchNorms on the process groups {0, 1} and {2}: ranks 0 and 1 normalize
    by their two batches together, rank 2 by its own (its group has one rank: BatchNorm2d);
    the gradients are averaged over all three."""
    batches, groups = [2, 1, 2], [[0, 1], [2]]
    spec = make_spec(torch.float64, batches, groups=groups)
    results = run_ranks(tmp_path, spec, world=3)
    b = spec["bounds"]
    wants = reference_run(spec, 3, parts=[(b[0], b[2]), (b[2], b[3])])
    compare(results[0], wants[0], "fp64", slice(b[0], b[1]), "rank 0 of {0, 1}")
    compare(results[1], wants[0], "fp64", slice(b[1], b[2]), "rank 1 of {0, 1}")
    compare(results[2], wants[1], "fp64", slice(None), "rank 2 of {2}")
    assert_ranks_agree(results[:2])
    for a, c in zip(results[0]["params"], results[2]["params"], strict=True):
        assert torch.equal(a, c)


# The interpreter runs: 8x8 images (a quarter of the float64 runs' 16x16, which cost nothing
# extra) still give each rank several 16-pixel tiles at the top level and a 2x2 bottleneck.
@pytest.mark.slow  # two ranks of float32 training steps through the interpreter
@pytest.mark.parametrize("batches", [[3, 1], [4, 0]], ids=["3+1", "4+0"])
def test_two_ranks_float32_kernels(tmp_path, batches):
    check_sync_run(tmp_path, torch.float32, batches, size=8)


@pytest.mark.slow  # dynamo + AOTAutograd in each rank
def test_two_ranks_compiled_fullgraph(tmp_path):
    """``torch.compile(fullgraph=True)``: the sync ops are opaque calls in the graphs (forward
    and AOTAutograd's backward); their collectives run when the compiled code calls them."""
    check_sync_run(tmp_path, torch.float64, [2, 1], compile=True)


# ------------------------------------------------------------------ DDP on CPU (gloo)
def check_ddp_run(tmp_path, dtype, batches, static_graph, size=16):
    spec = make_spec(dtype, batches, mode="ddp", static_graph=static_graph, size=size)
    world = len(batches)
    results = run_ranks(tmp_path, spec, world)
    parts = list(zip(spec["bounds"][:-1], spec["bounds"][1:], strict=True))
    wants = reference_run(spec, world, parts)
    tol = "fp64" if dtype == torch.float64 else tolerance_name(dtype)
    n_params = len(results[0]["params"])
    for r, (res, want) in enumerate(zip(results, wants, strict=True)):
        assert res["supported"]
        # Each rank's BatchNorm2d normalizes by its own images; the gradients are DDP's average.
        compare(res, want, tol, slice(None), f"DDP rank {r}")
        assert res["comm_hook_calls"] >= len(spec["xs"]), "DDP's comm hook never ran"
        assert res["grad_hooks"] == n_params * len(spec["xs"]), "a parameter got no gradient"
    for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow  # two rank processes (~7 s)
def test_ddp_float64_gradients_averaged(tmp_path):
    """``DistributedDataParallel(UNet)``: the guard accepts the module inside DDP, every
    parameter gets a gradient (no unused-parameter error), the comm hook averages them."""
    check_ddp_run(tmp_path, torch.float64, [2, 2], static_graph=False)


@pytest.mark.slow  # two ranks of float32 DDP steps through the interpreter
def test_ddp_float32_kernels_static_graph(tmp_path):
    check_ddp_run(tmp_path, torch.float32, [2, 1], static_graph=True, size=8)


# ------------------------------------------------------------------ one process
@pytest.fixture
def single_rank_group(tmp_path):
    """torch.distributed initialised with one rank (gloo): nothing to synchronise with."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("initialised", [False, True], ids=["no-process-group", "world-size-1"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)], ids=["fp64", "fp32"]
)  # fp32 runs the kernels through the interpreter (~8 s each)
def test_unsynchronised_syncbn_is_batchnorm(initialised, dtype, request):
    """Without ranks to synchronise with, a converted model trains exactly as BatchNorm2d does,
    on the fused path (no warning)."""
    if initialised:
        request.getfixturevalue("single_rank_group")
    ref, model = train_pair(dtype, **NARROW)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert fastunet.check_fused_support(model).supported
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastunet.FusedPathWarning)
        assert_same_training_step(ref, model, x, tolerance_name(dtype), "SyncBatchNorm, one rank")


def test_eval_syncbn_is_batchnorm(single_rank_group):
    ref, model = train_pair(torch.float64, **NARROW)
    ref.eval()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert fastunet.check_fused_support(model).mode == "eval"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", fastunet.FusedPathWarning)
        assert_close(model(x), ref(x), "fp64", "eval SyncBatchNorm")


def test_bn_stats_sync_opcheck(single_rank_group):
    """Schema, fake, autograd registration and AOT dispatch of the sync op (one rank: the
    merge is the identity, the backward's all_reduce a copy)."""
    name = single_rank_group.group_name
    for dtype in (torch.float64, torch.float32):
        mean = torch.randn(5, dtype=dtype, requires_grad=True)
        var = torch.rand(5, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.fastunet.bn_stats_sync, (mean, var, 7, name))
        gm, gv = torch.randn(5, dtype=dtype), torch.randn(5, dtype=dtype)
        m_all, _, n_all = torch.ops.fastunet.bn_stats_sync(mean, var, 7, name)
        torch.library.opcheck(
            torch.ops.fastunet.bn_stats_sync_backward, (gm, gv, mean.detach(), m_all.detach(), n_all.detach(), 7, name)
        )
    mean = torch.randn(5, dtype=torch.float64, requires_grad=True)
    var = torch.rand(5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda m, v: torch.ops.fastunet.bn_stats_sync(m, v, 7, name)[:2], (mean, var))


def test_merge_is_batchnorm_statistics_of_the_concatenation():
    """Chan's fp64 merge of (mean, M2, count) rows, zero-count rows included, against the
    statistics of the concatenated values; and with large means (1000 ± 0.5) the local means
    arriving as fp32 cost no more than the fp32 rounding the single-process path normalizes with."""
    c = 6
    chunks = [torch.randn(n, c, dtype=torch.float64) * 0.5 + 1000 for n in (37, 0, 5, 1)]
    rows = []
    for t in chunks:
        n = t.shape[0]
        mean = t.mean(0).float() if n else torch.zeros(c)  # what the conv's epilogue hands over
        var = t.var(0, unbiased=False).float() if n else torch.zeros(c)
        rows.append(torch.cat([mean.double(), var.double() * n, torch.tensor([float(n)], dtype=torch.float64)]))
    mean, var, n = merge_stats(torch.stack(rows), c)
    whole = torch.cat(chunks)
    assert n.item() == whole.shape[0]
    true_mean, true_var = whole.mean(0), whole.var(0, unbiased=False)
    eps32 = torch.finfo(torch.float32).eps
    # The fp32 rounding of a mean of ~1000 is ~6e-5 absolute: 2.4e-4 of the spread's variance.
    assert (mean - true_mean).abs().max() <= eps32 * 1000
    assert ((var - true_var).abs() / true_var).max() <= 4 * eps32 * 1000 / 0.5
    exact = [torch.cat([t.mean(0), t.var(0, unbiased=False) * t.shape[0], torch.tensor([float(t.shape[0])])])
             if t.shape[0] else torch.zeros(2 * c + 1, dtype=torch.float64) for t in chunks]  # fmt: skip
    mean, var, _ = merge_stats(torch.stack(exact), c)
    assert_close(mean, true_mean, "fp64", "merged mean (exact inputs)")
    assert_close(var, true_var, "fp64", "merged var (exact inputs)")


def test_running_update_with_a_device_count(device):
    """``bn_running_update_`` with the global count as a tensor: the kernel (interpreter or GPU)
    and the composite agree with the host-count form."""
    for momentum in (0.1, None):
        mean, var = torch.randn(20, device=device), torch.rand(20, device=device)
        state = [torch.randn(20, device=device), torch.rand(20, device=device) + 0.5, torch.tensor(3, device=device)]
        host, tensor_count, composite = (copy.deepcopy(state) for _ in range(3))
        torch.ops.fastunet.bn_running_update_(mean, var, *host, momentum, 37)
        n = torch.tensor([37.0], dtype=torch.float64, device=device)
        torch.ops.fastunet.bn_running_update_(mean, var, *tensor_count, momentum, 0, n)
        torch.ops.fastunet.bn_running_update_(mean.double(), var.double(), *composite, momentum, 0, n)
        for a, b, c in zip(host, tensor_count, composite, strict=True):
            if a.is_floating_point():
                assert_close(b, a, "fp32", "count from the device")
                assert_close(c, a, "fp32", "composite, count from the device")
            else:
                assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------ ring 3
@pytest.fixture
def nccl_single_rank(tmp_path):
    if not HAS_CUDA or not dist.is_nccl_available():
        pytest.skip("needs an NVIDIA GPU and NCCL")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.parametrize("sync", [False, True], ids=["BatchNorm2d", "SyncBatchNorm"])
@pytest.mark.parametrize("static_graph", [False, True], ids=["dynamic", "static_graph"])
def test_ddp_on_gpu_one_rank(nccl_single_rank, sync, static_graph):
    """DDP (NCCL, one GPU) around the fused path: every parameter gets a gradient (no
    unused-parameter error on the second step), the gradient hooks fire, ``static_graph``
    works, and the steps follow the float64 reference."""
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device("cuda", 0)
    ref, model = train_pair(torch.float32, device, **NARROW)
    if sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = DistributedDataParallel(model, device_ids=[0], static_graph=static_graph)
    hooks = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: hooks.append(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    tol = tolerance_name(torch.float32)
    for step in range(3):
        x = torch.randn(2, 3, 32, 32, device=device)
        g = torch.randn(2, 2, 32, 32, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("error", fastunet.FusedPathWarning)
            y = ddp(x)
        (y * g).sum().backward()
        yr = ref(x.double())
        (yr * g.double()).sum().backward()
        assert_close(y, yr, tol, f"step {step}: output")
        scale = max(p.grad.pow(2).mean().sqrt().item() for p in ref.parameters())
        for (name, pr), pm in zip(ref.named_parameters(), model.parameters(), strict=True):
            assert_close(pm.grad, pr.grad, tol, f"step {step}: grad of {name}", scale=scale)
        assert len(hooks) == len(list(model.parameters())) * (step + 1)
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()

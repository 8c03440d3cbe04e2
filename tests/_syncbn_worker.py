"""One rank of the multi-process tests in ``tests/test_syncbn.py`` (run as a script, one process
per rank, gloo on CPU through Triton's interpreter).

``python tests/_syncbn_worker.py SPEC RANK``: SPEC is a ``torch.save``d dict written by the test:

* ``init``: the ``file://`` rendezvous, ``world``: the number of ranks, ``mode``: ``"sync"``
  (a SyncBatchNorm model, gradients averaged by hand as DDP would), ``"ddp"`` (a BatchNorm2d
  model inside ``DistributedDataParallel``, with a counting comm hook) or ``"error"`` (one
  forward that must raise ``ValueError``);
* ``state``: the initial state_dict, ``dtype``, ``options`` (UNet options), ``xs``/``gs``: per
  step the whole batch and the output weights (the loss is ``(model(x_r) * g_r).sum()``),
  ``bounds``: where each rank's slice of the batch starts and ends, ``lr``, ``compile``,
  ``static_graph``, ``groups``: None (SyncBatchNorm's default group) or a partition of the ranks
  into process groups, each SyncBatchNorm's ``process_group`` set to this rank's.

Writes ``SPEC.rank{RANK}.pt``: per step the output, input gradient and (averaged) parameter
gradients, then the parameters and buffers after the last step, and what the hooks counted.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _interpreter_options import speed_up  # noqa: E402

import fastunet  # noqa: E402

speed_up()  # of Triton's interpreter: the work it does for nothing


def main(spec_path: str, rank: int) -> None:
    spec = torch.load(spec_path, weights_only=False)
    world = spec["world"]
    fastunet.set_backend("triton")
    # A rank that fails must not leave the others waiting for the test's own timeout.
    dist.init_process_group(
        "gloo", init_method=spec["init"], rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        result = run(spec, rank, world)
    finally:
        dist.destroy_process_group()
    torch.save(result, f"{spec_path}.rank{rank}.pt")


def run(spec: dict, rank: int, world: int) -> dict:
    dtype = spec["dtype"]
    model = fastunet.UNet(3, 1, **spec["options"])
    model.load_state_dict(spec["state"])
    model = model.to(dtype).train()
    start, stop = spec["bounds"][rank], spec["bounds"][rank + 1]
    result = {"steps": [], "comm_hook_calls": 0, "grad_hooks": 0}
    if spec["mode"] == "error":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        try:
            model(spec["xs"][0][start:stop].to(dtype))
        except ValueError as e:
            result["error"] = str(e)
        return result

    warnings.simplefilter("error", fastunet.FusedPathWarning)  # the fused path, or fail
    if spec["mode"] == "sync":
        group = None
        if spec["groups"] is not None:
            group, _ = dist.new_subgroups_by_enumeration(spec["groups"])
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
        net = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, static_graph=spec["static_graph"], broadcast_buffers=False)

        def averaging_hook(state, bucket):
            result["comm_hook_calls"] += 1
            fut = dist.all_reduce(bucket.buffer() / world, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        net.register_comm_hook(None, averaging_hook)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: result.__setitem__("grad_hooks", result["grad_hooks"] + 1))
    fn = torch.compile(net, fullgraph=True, backend="aot_eager") if spec["compile"] else net
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9)
    for x, g in zip(spec["xs"], spec["gs"], strict=True):
        x = x[start:stop].to(dtype).requires_grad_()
        opt.zero_grad()
        y = fn(x)
        (y * g[start:stop].to(y.dtype)).sum().backward()
        if spec["mode"] == "sync":
            for p in model.parameters():  # what DDP does, by hand (DDP refuses SyncBatchNorm on CPU)
                dist.all_reduce(p.grad)
                p.grad /= world
        result["steps"].append(
            {"y": y.detach(), "x_grad": x.grad, "grads": [p.grad.clone() for p in model.parameters()]}
        )
        opt.step()
    result["params"] = [p.detach().clone() for p in model.parameters()]
    result["buffers"] = [b.clone() for b in model.buffers()]
    result["supported"] = fastunet.check_fused_support(model).supported
    return result


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

"""torch.compile of the whole model with the fused ops forced: one graph, the same numbers."""

import pytest
import torch
from helpers import assert_close, model_pair

import fastunet

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _restore_backend():
    before = fastunet.get_backend()
    yield
    fastunet.set_backend(before)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_fused(train):
    fastunet.set_backend("triton")
    torch._dynamo.reset()
    ref, model = model_pair(3, 2, base_channels=4, depth=2)
    ref.train(train)
    model.train(train)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, yr = compiled(xc), ref(xr)
    assert_close(yc, yr, "fp64", "compiled output")
    yc.sum().backward()
    yr.sum().backward()
    assert_close(xc.grad, xr.grad, "fp64", "compiled input grad")
    for (name, pr), pm in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert_close(pm.grad, pr.grad, "fp64", f"compiled grad of {name}", scale=1.0)


def test_compile_inductor_inference():
    """The default (inductor) backend with the ops as opaque extern calls."""
    fastunet.set_backend("triton")
    torch._dynamo.reset()
    ref, model = model_pair(3, 2, base_channels=4, depth=2)
    ref.eval()
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_close(compiled(x), ref(x), "fp64", "inductor output")


def test_compile_reduce_overhead_inference():
    """``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs through inductor on a GPU)
    takes the fused ops as opaque calls: same numbers, no recompile on the second call."""
    fastunet.set_backend("triton")
    torch._dynamo.reset()
    ref, model = model_pair(3, 2, base_channels=4, depth=2)
    ref.eval()
    model.eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
            assert_close(compiled(x), ref(x), "fp64", "reduce-overhead output")


# ------------------------------------------------------------------ the CPU fold under torch.compile
def _graph_ops(store: list):
    """A torch.compile backend that records the ops of each graph and runs it as traced."""

    def backend(gm, example_inputs):
        store.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    return backend


def _has_fold(ops: set) -> bool:
    """Whether a graph calls the fold's op (named with or without its overload, by torch version)."""
    return any(op.split(".default")[0] == "fastunet.cpu_fold_forward" for op in ops)


def test_compile_keeps_the_cpu_fold_as_one_op():
    """On CPU (backend "auto") an eval model compiles to one opaque fold call: the same numbers as
    the eager fold, never the unfolded module tree inductor would run slower."""
    fastunet.set_backend("auto")
    torch._dynamo.reset()
    ref, model = model_pair(3, 2, base_channels=4, depth=2, dtype=torch.float32)
    ref.eval(), model.eval()
    graphs = []
    compiled = torch.compile(model, backend=_graph_ops(graphs), fullgraph=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = compiled(x)
        assert torch.equal(y, model(x))
        assert_close(y, ref.double()(x.double()), "fp32", "compiled CPU fold")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert compiled(x).dtype == torch.bfloat16
        xc = x.contiguous(memory_format=torch.channels_last)
        assert compiled(xc).is_contiguous(memory_format=torch.channels_last)
    assert all(_has_fold(ops) and not any("convolution" in o for o in ops) for ops in graphs)


def test_compile_traces_the_module_tree_for_an_input_gradient():
    fastunet.set_backend("auto")
    torch._dynamo.reset()
    ref, model = model_pair(3, 2, base_channels=4, depth=2)
    ref.eval(), model.eval().requires_grad_(False)
    graphs = []
    compiled = torch.compile(model, backend=_graph_ops(graphs))
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(xc).sum().backward()
    ref(xr).sum().backward()
    assert_close(xc.grad, xr.grad, "fp64", "input grad through the compiled module tree")
    assert graphs and not any(_has_fold(ops) for ops in graphs)


def test_compile_gives_each_model_its_own_fold():
    """The op names its model by a constant baked at trace time: a second model of the same
    architecture (other weights) gets its own graph, through one compiled function too."""
    fastunet.set_backend("auto")
    torch._dynamo.reset()
    _, a = model_pair(3, 2, base_channels=4, depth=2, dtype=torch.float32)
    _, b = model_pair(3, 2, base_channels=4, depth=2, dtype=torch.float32)  # other random weights
    a.eval(), b.eval()
    graphs = []
    forward = torch.compile(lambda m, x: m(x), backend=_graph_ops(graphs))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ya, yb = forward(a, x), forward(b, x)
        assert not torch.equal(ya, yb)
        assert torch.equal(ya, a(x)) and torch.equal(yb, b(x))
    assert len(graphs) == 2 and all(_has_fold(ops) for ops in graphs)


def test_compile_traces_the_module_tree_when_a_parameter_needs_a_gradient():
    """Eval mode with the encoder frozen and the rest trainable (fine-tuning with frozen
    BatchNorm statistics): the gradient reaches the trainable parameters, as in eager mode."""
    fastunet.set_backend("auto")
    torch._dynamo.reset()
    ref, model = model_pair(3, 2, base_channels=4, depth=2)
    ref.eval(), model.eval()
    ref.conv1.requires_grad_(False), model.conv1.requires_grad_(False)
    graphs = []
    compiled = torch.compile(model, backend=_graph_ops(graphs))
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    compiled(x).sum().backward()
    ref(x).sum().backward()
    assert_close(model.conv3.conv[0].weight.grad, ref.conv3.conv[0].weight.grad, "fp64", "decoder weight grad")
    assert model.conv1.conv[0].weight.grad is None
    assert graphs and not any(_has_fold(ops) for ops in graphs)


def test_the_fold_handle_carries_assume_constant_results_mark():
    """``cpu_fold._handle`` is marked as ``torch.compiler.assume_constant_result`` marks (set by
    hand so that ``import fastunet`` does not import torch._dynamo): the same attribute."""
    from fastunet import cpu_fold

    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert {k: v for k, v in vars(marked).items()} == {"_dynamo_marked_constant": True}
    assert cpu_fold._handle._dynamo_marked_constant is True

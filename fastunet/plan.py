"""One description of the network: the plan every fast path reads.

``UNetReference`` writes the U-Net as plain modules and a plain forward (the truth the tests
compare against). Everything else that needs the topology reads it from here: ``plan_of(model)``
is a short list of typed steps, built once per architecture (the model's options) and cached:

* ``DoubleConv``: two ``Conv`` units (3x3 'same' conv -> norm -> activation), then an optional
  ``nn.Dropout``; its first conv reads the pending sources (the previous output, or the two
  sources a ``Concat`` left);
* ``Pool``: keeps its input as the next skip, then 2x2 max-pools (flooring odd sizes);
* ``Up``: one up-sampling of each kind (``transpose``, ``nearest_conv``, ``bilinear``);
* ``Concat``: pops the skip and pairs it with the up-sampled map in the concat order, zero-padding
  the up-sampled map to the skip's size for ``odd_sizes="pad"``;
* ``PreHead``: the optional 3x3 conv + activation before the head;
* ``Head``: the 1x1 conv and the output activation.

Each step names the modules it reads by their paths in the module tree (``conv3.conv.4``,
``up6.conv``, ...) and the widths they must have; ``Plan.slots`` lists every module the forward
calls, in call order, with its role. Who reads the plan:

* ``fastunet.guard`` checks the module tree against the slots (one set of rules per role,
  from which both its fast answer and its explanation come) and says whether the fused kernels
  implement the steps;
* ``fastunet.fused`` runs the steps on the Triton ops (inference and training forms);
* ``fastunet.cpu_fold`` runs them on eager ops with BatchNorm folded into the convs.

The plan is derived from the options, not read off the modules: the guard then checks what the
tree holds against what the options say it should, instead of trusting the tree it checks. An
architecture option is added in the reference (its modules), here (its steps or a field of
one) and in the executors' handling of that step kind; nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reference import ACTIVATIONS, ACTS, CONCATS, NORMS, UPSAMPLINGS
from .validation import ODD_SIZES

__all__ = [
    "Concat",
    "Conv",
    "DoubleConv",
    "Head",
    "Plan",
    "Pool",
    "PreHead",
    "Slot",
    "Up",
    "arch_key",
    "build_plan",
    "execute",
    "plan_of",
]


@dataclass(frozen=True, slots=True)
class Conv:
    """A 3x3 conv (``padding`` 1, stride 1) -> norm -> activation unit.

    ``index``: its position among the plan's convs in call order (the executors keep per-conv
    weights in that order). ``conv``/``norm``/``act``: the paths of its modules (``norm`` None
    where the tree has no norm module: the pre-head). ``norm_kind``: ``"batch"``,
    ``"instance"`` or ``"none"``; ``act_kind``: ``"relu"`` or ``"leaky_relu"``.
    """

    index: int
    conv: str
    norm: str | None
    act: str
    cin: int
    cout: int
    norm_kind: str
    act_kind: str
    padding: int = 1


@dataclass(frozen=True, slots=True)
class DoubleConv:
    """``path`` (a ``DoubleConv``): ``first`` then ``second``, then the ``nn.Dropout`` at path
    ``dropout`` (None: the block has none). ``first`` reads the pending sources."""

    path: str
    first: Conv
    second: Conv
    dropout: str | None


@dataclass(frozen=True, slots=True)
class Pool:
    """``path`` (``nn.MaxPool2d(2)``): its input becomes the next skip, its output the next input."""

    path: str


@dataclass(frozen=True, slots=True)
class Up:
    """``path``: an up-sampling of ``kind`` from ``cin`` to ``cout`` channels (a bilinear one keeps
    its input's). ``params``: the path of the module holding its weights (the
    ``ConvTranspose2d`` itself, a ``NearestConvUp``'s ``conv``; None for bilinear); ``index``:
    its position among the plan's ups."""

    index: int
    path: str
    kind: str
    cin: int
    cout: int
    params: str | None


@dataclass(frozen=True, slots=True)
class Concat:
    """The next conv reads ``cat([up, skip])`` (``up_first``) or ``cat([skip, up])`` of the last
    ``Up``'s output and the last skip kept; ``pad``: the up-sampled map is zero-padded to the
    skip's size first (``diff // 2`` before, the rest after)."""

    up_first: bool
    pad: bool


@dataclass(frozen=True, slots=True)
class PreHead:
    """``path`` (an ``nn.Sequential`` of a 3x3 conv and an activation) before the head."""

    path: str
    conv: Conv


@dataclass(frozen=True, slots=True)
class Head:
    """``path``: the 1x1 conv from ``cin`` to ``cout`` channels, then ``activation``."""

    path: str
    cin: int
    cout: int
    activation: str


@dataclass(frozen=True, slots=True)
class Slot:
    """A module the forward calls: its ``path``, its ``role`` (what the guard checks it against)
    and the role's arguments (widths, or for a container the modules it must hold)."""

    path: str
    role: str
    args: tuple = ()


@dataclass(frozen=True, eq=False)
class Plan:
    """The steps of one architecture, and the views of them the executors and the guard use.

    ``key``: the architecture (``arch_key``); ``steps``: in call order; ``convs``: every ``Conv``
    in call order (``convs[i].index == i``); ``ups``: every ``Up``; ``head``: the ``Head``;
    ``slots``: every module in call order.
    ``norm``/``act``/``upsampling``: the blocks' kinds (one per network).
    """

    key: tuple
    in_ch: int
    steps: tuple
    convs: tuple
    ups: tuple
    head: Head
    slots: tuple
    norm: str
    act: str
    upsampling: str


#: How the module of each ``act`` is called in explanations.
ACT_NAMES = {"relu": "ReLU", "leaky_relu": "LeakyReLU"}

#: The attributes of a model that make up its architecture, in ``arch_key`` order, with the
#: value a model built before the option existed has.
ARCH_ATTRS = (
    ("in_ch", None),
    ("out_ch", None),
    ("base_channels", None),
    ("depth", None),
    ("upsampling", "transpose"),
    ("norm", "batch"),
    ("act", "relu"),
    ("dropout", 0.0),
    ("pre_head_channels", 0),
    ("concat", "up_skip"),
    ("odd_sizes", "error"),
    ("out_activation", "sigmoid"),
)
ARCH_NAMES = tuple(name for name, _ in ARCH_ATTRS)


def arch_key(model) -> tuple:
    """The architecture of ``model`` (a ``UNetReference``): the values of ``ARCH_NAMES``."""
    return tuple(getattr(model, name, default) for name, default in ARCH_ATTRS)


def key_problem(key: tuple) -> str | None:
    """Why ``key`` is not an architecture the plan describes (one line), or None."""
    in_ch, out_ch, base, d, upsampling, norm, act, dropout, pre_head, concat, odd_sizes, activation = key
    if activation not in ACTIVATIONS:
        return f"has out_activation={activation!r}; the fused head implements {ACTIVATIONS}"
    if type(d) is not int or d < 1 or type(base) is not int or base < 1:
        return f"has depth={d!r}, base_channels={base!r}; the fused path needs positive ints"
    if not (type(in_ch) is int and in_ch > 0 and type(out_ch) is int and out_ch > 0):
        return f"has in_ch={in_ch!r}, out_ch={out_ch!r}; the fused path needs positive ints"
    checks = (("upsampling", upsampling, UPSAMPLINGS), ("norm", norm, NORMS), ("act", act, ACTS))
    for name, value, choices in checks:
        if value not in choices:
            return f"has {name}={value!r}; the fused path implements {choices}"
    if type(dropout) is not float or not 0.0 <= dropout < 1.0:
        return f"has dropout={dropout!r}; the fused path needs a float in [0, 1)"
    if type(pre_head) is not int or pre_head < 0:
        return f"has pre_head_channels={pre_head!r}; the fused path needs an int >= 0"
    if concat not in CONCATS:
        return f"has concat={concat!r}; the fused path implements {CONCATS}"
    if odd_sizes not in ODD_SIZES:
        return f"has odd_sizes={odd_sizes!r}; the fused path implements {ODD_SIZES}"
    return None


_PLANS: dict[tuple, Plan] = {}


def plan_of(model) -> Plan | None:
    """The cached plan of ``model``'s architecture, or None when its options are not ones the plan
    describes (``key_problem`` says why)."""
    return build_plan(arch_key(model))


def build_plan(key: tuple) -> Plan | None:
    """The plan of architecture ``key`` (cached: one per architecture), or None (see
    ``key_problem``)."""
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable option value: not an architecture
        return None
    if plan is None:
        if key_problem(key) is not None:
            return None
        plan = _PLANS[key] = _build(key)
    return plan


def _build(key: tuple) -> Plan:
    in_ch, out_ch, base, d, upsampling, norm, act, dropout, pre_head, concat, odd_sizes, activation = key
    widths = [base << i for i in range(d)]  # level i + 1
    bilinear = upsampling == "bilinear"
    steps, convs, ups, slots = [], [], [], []

    def unit(seq: str, i: int, cin: int, cout: int, has_norm: bool = True) -> Conv:
        """The conv at ``seq.i``, then its norm (unless ``has_norm`` is False) and activation."""
        norm_path, act_path = (f"{seq}.{i + 1}", f"{seq}.{i + 2}") if has_norm else (None, f"{seq}.{i + 1}")
        conv = Conv(len(convs), f"{seq}.{i}", norm_path, act_path, cin, cout, norm if has_norm else "none", act)
        convs.append(conv)
        slots.append(Slot(conv.conv, "conv3x3", (cin, cout)))
        if has_norm:
            slots.append(Slot(conv.norm, f"norm:{norm}", (cout,)))
        slots.append(Slot(conv.act, f"act:{act}"))
        return conv

    def double(name: str, cin: int, mid: int, cout: int, drop: bool) -> None:
        seq = f"{name}.conv"
        slots.append(Slot(name, "double_conv"))
        layers = ("conv", "norm", ACT_NAMES[act]) * 2 + (("Dropout",) if drop else ())
        slots.append(Slot(seq, "sequential", layers))
        first, second = unit(seq, 0, cin, mid), unit(seq, 3, mid, cout)
        step = DoubleConv(name, first, second, f"{seq}.6" if drop else None)
        if drop:
            slots.append(Slot(step.dropout, "dropout"))
        steps.append(step)

    prev = in_ch
    for i, width in enumerate(widths, start=1):
        double(f"conv{i}", prev, width, width, dropout > 0 and i == d)
        steps.append(Pool(f"pool{i}"))
        slots.append(Slot(f"pool{i}", "max_pool"))
        prev = width
    # milesial's bilinear model has no up conv to halve the bottleneck's width (his factor = 2)
    bottleneck = widths[-1] if bilinear else 2 * widths[-1]
    double(f"conv{d + 1}", prev, bottleneck, bottleneck, dropout > 0)
    for k in range(d + 2, 2 * d + 2):
        skip = widths[2 * d + 1 - k]
        name = f"up{k}"
        if bilinear:
            up = Up(len(ups), name, "bilinear", skip, skip, None)
            slots.append(Slot(name, "upsample_bilinear"))
        elif upsampling == "transpose":
            up = Up(len(ups), name, "transpose", 2 * skip, skip, name)
            slots.append(Slot(name, "conv_transpose", (2 * skip, skip)))
        else:
            up = Up(len(ups), name, "nearest_conv", 2 * skip, skip, f"{name}.conv")
            slots.append(Slot(name, "nearest_conv_up"))
            slots.append(Slot(up.params, "conv2x2", (2 * skip, skip)))
        ups.append(up)
        steps.append(up)
        steps.append(Concat(concat == "up_skip", odd_sizes == "pad"))
        # in: the up-sampled map + the skip; bilinear: out is the next skip's width (milesial)
        out = (base if k == 2 * d + 1 else skip // 2) if bilinear else skip
        double(f"conv{k}", 2 * skip, skip, out, False)
    if pre_head:
        slots.append(Slot("pre_head", "sequential", ("conv", ACT_NAMES[act])))
        steps.append(PreHead("pre_head", unit("pre_head", 0, base, pre_head, has_norm=False)))
    head = Head(f"conv{2 * d + 2}", pre_head or base, out_ch, activation)
    slots.append(Slot(head.path, "head", (head.cin, head.cout)))
    steps.append(head)
    return Plan(key, in_ch, tuple(steps), tuple(convs), tuple(ups), head, tuple(slots), norm, act, upsampling)


def execute(plan: Plan, form, x):
    """Run ``plan``'s steps on ``x`` with ``form``, an executor's implementation of each step kind:

    ``entry(x)`` -> activation; ``conv(conv, first, second=None, up=None)`` -> activation (one
    source, or a decoder's two sources as ``concat`` paired them); ``dropout(double_conv, a)``;
    ``pool(a)``; ``up(up, a)`` -> the up-sampled map (or what stands for it); ``concat(concat,
    skip, u, up)`` -> the next conv's ``(first, second, up)``; ``head(head, a)`` -> the output.
    What an activation is (a tensor, a raw tensor with the transform its reader applies) is the
    form's business; the order of the steps, the skips and the sources are this walk's.
    """
    act = form.entry(x)
    skips, sources, up, u = [], None, None, None
    for step in plan.steps:
        kind = type(step)
        if kind is DoubleConv:
            act = form.conv(step.first, act) if sources is None else form.conv(step.first, *sources)
            act, sources = form.conv(step.second, act), None
            if step.dropout is not None:
                act = form.dropout(step, act)
        elif kind is Pool:
            skips.append(act)
            act = form.pool(act)
        elif kind is Up:
            up, u = step, form.up(step, act)
        elif kind is Concat:
            sources = form.concat(step, skips.pop(), u, up)
        elif kind is PreHead:
            act = form.conv(step.conv, act)
        else:
            return form.head(step, act)
    raise AssertionError("a plan ends with its head")

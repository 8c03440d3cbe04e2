"""``fastunet.UNet``: the drop-in replacement for the classic U-Net.

It *is* the reference model (a subclass of ``UNetReference``), so it has the same module tree,
the same parameters and the same state_dict keys, and a reference checkpoint loads with
``strict=True`` both ways. Only ``forward`` differs: it validates the input, then runs its plan
(``fastunet.plan``: built once per architecture) on one of the executors, or the module tree:

* the fused path (``fastunet.fused``: ``torch.ops.fastunet.*``, its inference and training
  forms) when ``fastunet.backend`` says so and the guard (``fastunet.guard``) accepts the tree;
* on CPU (the ``"auto"`` backend on CPU tensors), an eval-mode forward that needs no parameter
  gradient on a tree the guard accepts: the plan with each BatchNorm folded into its conv, run
  channels_last (``fastunet.cpu_fold``);
* otherwise the module tree (the reference math; the ``"eager"`` backend always runs it).

Host time per inference forward is what decides small batches: the module tree is walked once
per forward, by the guard, whose walk also hands over the layers, and the executors prepare
everything that depends only on the weights once and reuse it while the parameters and buffers
are the same tensors at the same version.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import cpu_fold, fused
from .backend import get_backend, use_fused
from .distributed import sync_group
from .guard import check_fused_support, layers_of, warn_unsupported
from .ops import derived
from .plan import plan_of
from .recompute import check_recompute
from .reference import UNetReference
from .validation import validate_input

#: Module type -> whether ``nn.Module.zero_grad``'s walk over it is ``_reset_grads``'s (see there).
_PLAIN_WALK: dict[type, bool] = {}


def _plain_walk(cls: type) -> bool:
    M = nn.Module
    plain = cls.named_modules is M.named_modules and cls.__hash__ is M.__hash__ and cls.__eq__ is M.__eq__
    _PLAIN_WALK[cls] = plain
    return plain


def _reset_grads(root: nn.Module) -> bool:
    """Set every parameter gradient of ``root``'s tree to None, as ``nn.Module.zero_grad()`` does,
    by a walk over the modules' ``_modules``/``_parameters`` dicts (torch's walk is generators and a
    parameter set: ~580 Python calls for the classic U-Net). Returns False where torch's walk could
    differ (a module type overriding how the tree or the parameters are listed, or module hashing):
    the caller then runs torch's, which resets the rest the same way."""
    cls, M = type(root), nn.Module
    if (cls.parameters, cls.named_parameters, cls._named_members) != (
        M.parameters,
        M.named_parameters,
        M._named_members,
    ):
        return False
    plain = _PLAIN_WALK
    stack, seen = [root], {id(root)}
    while stack:
        m = stack.pop()
        cls = type(m)
        if not (plain[cls] if cls in plain else _plain_walk(cls)):
            return False
        for p in m._parameters.values():
            if p is not None and p.grad is not None:
                p.grad = None
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return True


class UNet(UNetReference):
    """Drop-in U-Net: ``UNet(in_ch, out_ch)`` with the classic model's modules and weights.

    Same options as ``UNetReference`` (keyword-only ``base_channels``, ``depth``,
    ``out_activation``, the architecture options and ``preset``; every preset runs fused).
    ``forward(x)``: ``[N, in_ch, H, W] -> [N, out_ch, H, W]``, H and W multiples of
    ``2**depth`` (any H, W >= ``2**depth`` with ``odd_sizes="pad"``); on the fused path the
    output is channels_last.

    Inference prepares the weights once (packed layouts, folded BatchNorm; on CPU the folded
    channels_last weights of ``fastunet.cpu_fold``) and reuses them while every parameter and
    buffer is unchanged; in training the ops take the parameters as they are and pack inside (so
    autograd saves no packed copies). ``recompute=True`` (keyword, also a settable attribute): fused
    training keeps about a third less for backward and reruns each block's first conv in backward
    (``fastunet.recompute``; docs/training.md). ``cuda_graph(example)`` gives a CUDA-graph replay of the
    inference forward for small batches.
    """

    def __init__(self, in_ch: int, out_ch: int, *, recompute: bool = False, **options):
        super().__init__(in_ch, out_ch, **options)
        self.recompute = recompute
        self._eval_plans: dict[tuple, fused.Weights] = {}  # the inference form's, per dtype/device
        plan_of(self)  # built now, outside any torch.compile trace (one per architecture)

    @property
    def recompute(self) -> bool:
        """Whether fused training recomputes each DoubleConv's middle activation in backward instead
        of keeping it (``fastunet.recompute``; settable; not part of the architecture)."""
        return self._recompute

    @recompute.setter
    def recompute(self, value: bool) -> None:
        self._recompute = check_recompute(value)

    def extra_repr(self) -> str:
        return "recompute=True" if self._recompute else ""

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        first = self.conv1.conv[0].weight
        validate_input(
            x, in_ch=self.in_ch, depth=self.depth, param_dtype=first.dtype, param_device=first.device,
            odd_sizes=self.odd_sizes,
        )  # fmt: skip
        eager = not self._empty_batch_syncs(x) if x.numel() == 0 else not use_fused(x)
        if eager:
            # The CPU fallback's inference form; the cheap exclusions come first so that training
            # (and eval with gradients for the parameters) never pays for the guard.
            if (
                not self.training
                and x.device.type == "cpu"
                and not (first.requires_grad and torch.is_grad_enabled())
                and x.numel()
                and get_backend() == "auto"
            ):
                y = self._cpu_folded_forward(x)
                if y is not None:
                    return y
            return self._reference_forward(x)
        # Anything the fused path would silently ignore (a hook, a swapped module, a changed
        # conv attribute, ...) sends the call down the eager path instead (see fastunet.guard).
        support = check_fused_support(self)
        if not support.supported:
            warn_unsupported(self, support)
            return self._reference_forward(x)
        return self._fused_forward(x, support.mode == "train")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``nn.Module.zero_grad``: the same gradients reset (``set_to_none``, the default: by a
        walk over the module dicts, ``_reset_grads``; otherwise, or for a DataParallel replica, by
        torch's own)."""
        if set_to_none and not getattr(self, "_is_replica", False) and _reset_grads(self):
            return
        super().zero_grad(set_to_none)

    def _empty_batch_syncs(self, x: Tensor) -> bool:
        """Whether an empty batch must run the fused path anyway: some ``nn.SyncBatchNorm``
        merges its statistics across ranks now, and the other ranks' fused forwards wait in
        those collectives for this one's (an empty rank takes part with a zero count)."""
        return any(sync_group(m) is not None for m in self.modules()) and use_fused(x)

    def _cpu_folded_forward(self, x: Tensor) -> Tensor | None:
        """The CPU fallback with BatchNorm folded (``fastunet.cpu_fold``), or None when the module
        tree must run: the guard refuses it (a hook, a swapped module, ...: those take effect only
        when the submodules are called), some BatchNorm uses batch statistics, a gradient has to
        reach a parameter (the folded weights are detached). Under ``torch.compile`` the fold is
        one opaque op (``cpu_fold.compiled_forward``) that makes these checks when it runs.
        No warning: the module tree is the reference math.
        """
        if torch.compiler.is_compiling():
            return cpu_fold.compiled_forward(self, x)
        support = check_fused_support(self, kernels=False)
        if not support.supported or support.mode != "eval":
            return None
        return cpu_fold.forward(self, x, layers_of(self))

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .double(), ... replace the parameters: the folded copies of the old
        # ones would only hold memory until the next CPU forward noticed.
        cpu_fold.forget(self)
        return super()._apply(fn, *args, **kwargs)

    def refresh(self) -> None:
        """Drop every copy of the weights this model prepared (the inference weights of each
        dtype/device, the CPU fold's folded and prepacked weights, opt-in training packs): the next
        forward derives them from the parameters and buffers as they are then.

        Needed only after editing parameters or buffers in place through ``.data`` (e.g.
        ``p.data.mul_(a).add_(q.data, alpha=1 - a)``) on a GPU, or partially on the CPU: such an
        edit leaves the tensor's version counter unchanged, so the caches cannot see it
        (``fastunet._snapshot``). Optimizer steps, ``load_state_dict``, ``.to()``, assignments and
        in-place updates under ``torch.no_grad()`` are seen without it. A ``cuda_graph`` runner
        re-captures on its next call.
        """
        self._eval_plans.clear()
        cpu_fold.forget(self)
        derived.clear()

    def _fused_forward(self, x: Tensor, batch_stats: bool) -> Tensor:
        """The fused path (``fastunet.fused``): the training form when some BatchNorm uses batch
        statistics."""
        return fused.forward(self, x, layers_of(self), batch_stats)

    def cuda_graph(self, example: Tensor | None = None, *, warmup: int = 2):
        """A ``fastunet.graphs.CudaGraphRunner`` replaying this model's inference forward from
        CUDA graphs, one per input shape/dtype/autocast state (captured on first sight, or right
        away for ``example``). ``runner(x)`` returns the output in a static buffer that the next
        call of the same signature overwrites. Needs an NVIDIA GPU and the model in eval mode.
        """
        from .graphs import CudaGraphRunner

        return CudaGraphRunner(self, example, warmup=warmup)

    def _inference_weights(self, x: Tensor) -> fused.Weights | None:
        """The weights a fused inference forward on ``x`` reads now (None: that forward would take
        the eager or the training path). What ``CudaGraphRunner`` compares with the weights a
        graph captured: the same object means the same packed weights at the same addresses."""
        if not use_fused(x) or self.training:
            return None
        support = check_fused_support(self)
        if not support.supported or support.mode != "eval":
            return None
        layers = layers_of(self)
        if layers.plan.norm == "instance":  # runs the training form per sample: nothing is prepared
            return None
        return fused.eval_weights(self, layers, fused.compute_dtype(x), x.device)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed);
        see ``fastunet.checkpoint.save_pretrained``."""
        from .checkpoint import save_pretrained  # deferred: checkpoint imports this module

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, map_location="cpu"):
        """A model of this class built from ``directory``'s ``config.json`` with the weights of its
        ``model.safetensors`` on ``map_location``; see ``fastunet.checkpoint.load_pretrained``."""
        from .checkpoint import load_pretrained

        return load_pretrained(directory, cls=cls, map_location=map_location)

    @classmethod
    def from_keras(cls, source, **kw):
        """A model of this class (``preset="keras"``) holding the weights of a Keras U-Net
        (zhixuhao's ``unet()`` layout): ``source`` is a Keras 3 ``.weights.h5``, a legacy
        ``.h5`` (full model or weights only) or the list of ``keras_model.get_weights()``.
        Keyword options go to ``fastunet.convert.from_keras``, which documents them."""
        from .convert import from_keras  # deferred: h5py is an optional dependency

        return from_keras(source, cls=cls, **kw)

    @classmethod
    def from_milesial(cls, source, bilinear=None, **kw):
        """A model of this class (``preset="milesial"`` or ``"milesial-bilinear"``) holding the
        weights of milesial's ``Pytorch-UNet``: ``source`` is its state_dict or a checkpoint path.
        ``bilinear``: None infers the up-sampling from the weights. Keyword options go to
        ``fastunet.convert.from_milesial``, which documents them."""
        from .convert import from_milesial

        return from_milesial(source, bilinear=bilinear, cls=cls, **kw)

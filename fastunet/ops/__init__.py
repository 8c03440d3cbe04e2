"""The fused path's operators, registered with ``torch.library`` in the ``fastunet`` namespace
(importing this package registers every ``torch.ops.fastunet.*`` op).

Each op has a schema, a fake (meta) implementation for ``torch.compile``, a CPU and a CUDA
implementation, and an autograd formula, so ``loss.backward()``, ``torch.compile`` and
``torch.library.opcheck`` all work through them.

Implementations:

* **CUDA**: the Triton kernels of ``fastunet.kernels``.
* **CPU**: the same Triton kernels when Triton's interpreter is on (``TRITON_INTERPRET=1``,
  how the tests run the kernels without a GPU); otherwise an eager composite of plain torch ops.
* **float64** on any device: the eager composite (the kernels cover fp32, fp16 and bf16), which
  keeps float64 gradient checks through the op layer possible.

How an op is declared and called is ``fastunet.ops.op``: each op is declared once in its family
module (schema, fake, implementation, autograd formula: ``declare``) and every caller calls it
as ``calls.<name>(*args)`` on a calls object: ``DISPATCH`` (the registered op, for traces and
modes), ``DIRECT`` (the implementation, no dispatcher), ``AUTO`` (either, per call: the backward
formulas) or a ``Tape`` (a training forward as one autograd node, ``run_taped``), all filled from
the one registry ``OPS``. Backward formulas call backward ops (``conv3x3_weight_grad``,
``affine_relu_backward``, ...) through ``AUTO``, not the Triton launchers: an op with a fake
implementation is what AOTAutograd (torch.compile, opcheck) can trace through a backward. They
run Triton kernels where the forward does and eager composites elsewhere, have no autograd of
their own (no double backward), and recompute what is cheap (BatchNorm+ReLU of a raw input, an
unstored intermediate) instead of saving it.

Layout contract: every op returns a channels_last (NHWC) tensor; inputs may have any strides.
Scale, shift and biases are read in float32 (float64 for float64 inputs).

One module per op family, named after its kernel module, so a reader goes
``kernels/X.py <-> fastunet/ops/X.py <-> tests/kernels/test_X.py``:

| module | ops |
|---|---|
| ``conv3x3`` | ``conv3x3_bn_act(_head)``, ``conv3x3_bn_stats``, ``conv3x3_up_bn_act``, ``conv3x3_up_bn_stats`` |
| ``conv3x3_wgrad`` | ``conv3x3_weight_grad`` |
| ``upconv2x2`` | ``upconv2x2``, ``upconv2x2_input_grad``, ``upconv2x2_weight_grad`` |
| ``upconv_nearest2x2`` | ``upconv_nearest2x2``, ``upconv_nearest2x2_input_grad``, ``upconv_nearest2x2_weight_grad`` |
| ``maxpool2x2`` | ``maxpool2x2`` |
| ``head1x1`` | ``head1x1``, ``head1x1_input_grad``, ``head1x1_weight_grad`` |
| ``bn_train`` | ``bn_affine(_backward)``, ``bn_running_update_``, ``bn_stats_backward``, ``bn_stats_sync(_backward)`` |
| | ``bn_train_fold`` (composite: ``bn_train_fold_``, or the affine and the update apart under autograd) |
| ``norm_act_bwd`` | ``affine_relu_backward``, ``maxpool2x2_backward`` |
| ``entry`` | ``pad_channels_nhwc``, ``pad_weight_in`` (composite) |
| ``dropout`` | ``affine_relu_dropout`` (composite) |
| ``op`` | ``declare``, ``OPS``, ``DISPATCH``/``DIRECT``/``AUTO``, ``calls_for``, ``direct_ok``, ``kernel_package`` |
| ``tape`` | ``Tape``, ``run_taped`` |
| ``_common`` | helpers the families share: dtype and layout helpers, checks, composites, backward helpers |

``kernel_package()`` is the one (lazy) import of ``fastunet.kernels`` in the package.

The family modules import only ``_common`` and ``op``, never each other: cross-family backward
calls go through ``AUTO``. ``_common`` offers what several families use (public names of that
package-private module); a helper one family uses lives in that family's module.
"""

from __future__ import annotations

from ._common import unit_affine
from .bn_train import (
    bn_affine,
    bn_affine_backward,
    bn_running_update_,
    bn_stats_backward,
    bn_stats_sync,
    bn_stats_sync_backward,
    bn_train_fold,
    bn_train_fold_,
)
from .conv3x3 import conv3x3_bn_act, conv3x3_bn_act_head, conv3x3_bn_stats, conv3x3_up_bn_act, conv3x3_up_bn_stats
from .conv3x3_wgrad import conv3x3_weight_grad
from .dropout import affine_relu_dropout
from .entry import pad_channels_nhwc, pad_weight_in
from .head1x1 import head1x1, head1x1_input_grad, head1x1_weight_grad
from .maxpool2x2 import maxpool2x2
from .norm_act_bwd import affine_relu_backward, maxpool2x2_backward
from .op import AUTO, DIRECT, DISPATCH, OPS, calls_for, direct_ok, direct_ok_mutation, kernel_package
from .tape import Tape, run_taped
from .upconv2x2 import upconv2x2, upconv2x2_input_grad, upconv2x2_weight_grad
from .upconv_nearest2x2 import upconv_nearest2x2, upconv_nearest2x2_input_grad, upconv_nearest2x2_weight_grad

__all__ = [
    "AUTO",
    "DIRECT",
    "DISPATCH",
    "OPS",
    "Tape",
    "affine_relu_backward",
    "affine_relu_dropout",
    "bn_affine",
    "bn_affine_backward",
    "bn_running_update_",
    "bn_stats_backward",
    "bn_stats_sync",
    "bn_stats_sync_backward",
    "bn_train_fold",
    "bn_train_fold_",
    "calls_for",
    "direct_ok",
    "direct_ok_mutation",
    "conv3x3_bn_act",
    "conv3x3_bn_act_head",
    "conv3x3_bn_stats",
    "conv3x3_up_bn_act",
    "conv3x3_up_bn_stats",
    "conv3x3_weight_grad",
    "head1x1",
    "head1x1_input_grad",
    "head1x1_weight_grad",
    "kernel_package",
    "maxpool2x2",
    "maxpool2x2_backward",
    "pad_channels_nhwc",
    "pad_weight_in",
    "run_taped",
    "upconv2x2",
    "upconv2x2_input_grad",
    "upconv2x2_weight_grad",
    "upconv_nearest2x2",
    "upconv_nearest2x2_input_grad",
    "upconv_nearest2x2_weight_grad",
    "unit_affine",
]

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

Backward formulas call backward ops (``conv3x3_weight_grad``, ``affine_relu_backward``, ...)
through ``_common._bwd``, not the Triton launchers: an op with a fake implementation is what
AOTAutograd (torch.compile, opcheck) can trace through a backward. They run Triton kernels where
the forward does and eager composites elsewhere, have no autograd of their own (no double
backward), and recompute what is cheap (BatchNorm+ReLU of a raw input, an unstored
intermediate) instead of saving it.

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
| ``norm_act_bwd`` | ``affine_relu_backward``, ``maxpool2x2_backward`` |
| ``entry`` | ``pad_channels_nhwc`` (and ``_pad_weight_in``) |
| ``tape`` | ``direct``, ``Tape``, ``run_taped``, ``OpsNamespace``: how the model calls the ops |
| ``_common`` | shared helpers, checks, composites, the device guard, ``direct_ok``, ``_bwd``, ``kernel_package`` |

``kernel_package()`` is the one (lazy) import of ``fastunet.kernels`` in the package.

The family modules import only ``_common`` (and ``norm_act_bwd`` the pool's input check), never
each other's ops: cross-family backward calls go through ``_bwd``, which each module fills in.
"""

from __future__ import annotations

# Private names tests and notes refer to as ``fastunet.ops.<name>`` (kept when the module became a
# package; to patch one, patch it in the module that uses it, e.g. ``_common._device_guard``).
from ._common import _device_guard as _device_guard
from ._common import _on_input_device as _on_input_device
from ._common import _uncenter as _uncenter
from ._common import direct_ok, direct_ok_mutation, kernel_package
from .bn_train import (
    bn_affine,
    bn_affine_backward,
    bn_running_update_,
    bn_stats_backward,
    bn_stats_sync,
    bn_stats_sync_backward,
)
from .conv3x3 import conv3x3_bn_act, conv3x3_bn_act_head, conv3x3_bn_stats, conv3x3_up_bn_act, conv3x3_up_bn_stats
from .conv3x3_wgrad import conv3x3_weight_grad
from .entry import pad_channels_nhwc
from .head1x1 import head1x1, head1x1_input_grad, head1x1_weight_grad
from .maxpool2x2 import maxpool2x2
from .norm_act_bwd import affine_relu_backward, maxpool2x2_backward
from .tape import OpsNamespace, Tape, direct, run_taped
from .tape import _Untaped as _Untaped
from .upconv2x2 import upconv2x2, upconv2x2_input_grad, upconv2x2_weight_grad
from .upconv_nearest2x2 import upconv_nearest2x2, upconv_nearest2x2_input_grad, upconv_nearest2x2_weight_grad

__all__ = [
    "OpsNamespace",
    "Tape",
    "affine_relu_backward",
    "bn_affine",
    "bn_affine_backward",
    "bn_running_update_",
    "bn_stats_backward",
    "bn_stats_sync",
    "bn_stats_sync_backward",
    "direct",
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
    "run_taped",
    "upconv2x2",
    "upconv2x2_input_grad",
    "upconv2x2_weight_grad",
    "upconv_nearest2x2",
    "upconv_nearest2x2_input_grad",
    "upconv_nearest2x2_weight_grad",
]

"""fastunet's Triton kernels and their launchers (installed as ``fastunet.kernels``).

Launchers take and return torch tensors with logical NCHW shapes and any strides (channels_last
is the fast layout), check their inputs, pick a config and launch. No ``nn.Module`` and no
``torch.library`` here: ``fastunet.ops`` registers these as ``torch.ops.fastunet.*``.

| launcher | fuses |
|---|---|
| ``conv3x3_bn_act`` | 3x3 conv (optionally of ``cat([x, x2])``) + folded BN/bias + ReLU |
| ``conv3x3_bn_act_head`` | the same + 1x1 head + sigmoid/softmax in the epilogue |
| ``conv3x3_bn_stats`` | training conv: previous BN+ReLU on the loads, this BN's batch statistics in the epilogue |
| ``conv3x3_up_bn_act``, ``conv3x3_up_bn_stats`` | the same, one source read up-sampled: odd-size pad, bilinear x2 |
| ``bn_stats_finalize`` | merges the per-tile statistics into mean and variance (deterministic) |
| ``bn_affine``, ``bn_affine_backward`` | BatchNorm's (scale, shift) from the statistics, fp64, and its chain rule |
| ``bn_running_update_`` | ``nn.BatchNorm2d``'s running-statistics update, in place |
| ``bn_train_fold_`` | both of those in one launch: the running update in place and (scale, shift) |
| ``bn_stats_backward`` | the batch statistics' gradient reaching z, and its per-channel sum |
| ``affine_relu_backward`` | BN+ReLU-on-load backward: dx and per-channel dscale/dshift (deterministic) |
| ``maxpool2x2_backward`` | pool backward (torch's argmax rule), with the BN+ReLU-on-load backward |
| ``upconv2x2_input_grad``, ``upconv2x2_weight_grad`` | transposed-conv backward (deterministic, BN+ReLU on load) |
| ``head1x1_input_grad``, ``head1x1_weight_grad`` | 1x1 head backward |
| ``conv3x3_weight_grad`` | 3x3 conv weight gradient (split over pixels, deterministic), previous BN+ReLU on load |
| ``upconv2x2`` | ConvTranspose2d(k=2, s=2) + bias, phase-scatter epilogue |
| ``upconv_nearest2x2`` (``_input_grad``, ``_weight_grad``) | Keras' nearest x2 + 2x2 'same' conv (+ ReLU) |
| ``maxpool2x2`` | 2x2 max-pool, NaN-propagating |
| ``head1x1`` | 1x1 conv + activation |
| ``pad_cast_nhwc`` | the model's entry: cast + zero-pad to 16-byte NHWC pixels (vector loads in the first conv) |

Imported everywhere as ``fastunet.kernels`` (the package, the tests, the benchmarks); the
submodules named like a launcher (``head1x1``, ``maxpool2x2``, ``upconv2x2``,
``upconv_nearest2x2``) are reached with ``importlib.import_module("fastunet.kernels.<name>")``,
since the attribute is the launcher.

Launchers launch on the current CUDA device and stream; ``fastunet.ops`` makes the tensors'
device current around every op (a launcher called directly with tensors on another GPU
raises instead of launching there).
"""

from importlib import import_module

from .bn_stats import bn_stats_finalize
from .bn_train import bn_affine, bn_affine_backward, bn_running_update_, bn_stats_backward, bn_train_fold_
from .conv3x3 import (
    MAX_HEAD_C_OUT,
    MAX_HEAD_K,
    conv3x3_bn_act,
    conv3x3_bn_act_head,
    conv3x3_bn_stats,
    conv3x3_up_bn_act,
    conv3x3_up_bn_stats,
    pack_conv3x3_weight,
)
from .conv3x3_wgrad import conv3x3_weight_grad
from .entry import entry_channels, pad_cast_nhwc
from .head1x1 import head1x1
from .head1x1_bwd import head1x1_input_grad, head1x1_weight_grad
from .maxpool2x2 import maxpool2x2
from .norm_act_bwd import affine_relu_backward, maxpool2x2_backward
from .upconv2x2 import pack_upconv2x2_weight, upconv2x2
from .upconv2x2_bwd import upconv2x2_input_grad, upconv2x2_weight_grad
from .upconv_nearest2x2 import (
    pack_upconv_nearest2x2_weight,
    upconv_nearest2x2,
    upconv_nearest2x2_input_grad,
    upconv_nearest2x2_weight_grad,
)

#: Kernel modules that expose ``compile_specs(arch)`` for the offline compile report (ring 2).
KERNEL_MODULES = (
    "conv3x3",
    "conv3x3_tma",
    "bn_stats",
    "bn_train",
    "conv3x3_wgrad",
    "norm_act_bwd",
    "upconv2x2",
    "upconv_nearest2x2",
    "maxpool2x2",
    "head1x1",
    "upconv2x2_bwd",
    "head1x1_bwd",
    "_split_k",
    "entry",
)


def all_compile_specs(arch: int) -> list:
    """Every (kernel, config, dtype) ``KernelSpec`` the launchers can use on ``arch`` (80 or 90)."""
    specs = []
    for name in KERNEL_MODULES:
        specs += import_module(f"{__name__}.{name}").compile_specs(arch)
    return specs


__all__ = [
    "affine_relu_backward",
    "bn_affine",
    "bn_affine_backward",
    "bn_running_update_",
    "bn_train_fold_",
    "bn_stats_backward",
    "MAX_HEAD_C_OUT",
    "MAX_HEAD_K",
    "KERNEL_MODULES",
    "all_compile_specs",
    "bn_stats_finalize",
    "conv3x3_bn_act",
    "conv3x3_bn_act_head",
    "conv3x3_bn_stats",
    "conv3x3_up_bn_act",
    "conv3x3_up_bn_stats",
    "conv3x3_weight_grad",
    "entry_channels",
    "head1x1",
    "head1x1_input_grad",
    "head1x1_weight_grad",
    "maxpool2x2",
    "maxpool2x2_backward",
    "pack_conv3x3_weight",
    "pack_upconv2x2_weight",
    "pad_cast_nhwc",
    "upconv2x2",
    "upconv2x2_input_grad",
    "upconv2x2_weight_grad",
    "pack_upconv_nearest2x2_weight",
    "upconv_nearest2x2",
    "upconv_nearest2x2_input_grad",
    "upconv_nearest2x2_weight_grad",
]

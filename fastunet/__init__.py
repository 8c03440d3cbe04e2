"""fastunet: a drop-in U-Net for PyTorch whose hot paths are fused Triton GPU kernels.

``fastunet.UNet(in_ch, out_ch)`` has the classic U-Net's modules and state_dict keys; on NVIDIA
GPUs its forward runs fused Triton kernels, elsewhere the exact eager math. ``fastunet.load(path)``
builds one from any checkpoint it reads (``fastunet.formats``).
"""

from . import graphs, ops  # noqa: F401  (ops registers torch.ops.fastunet.*)
from .backend import BACKENDS, get_backend, get_cpu_fast_math, set_backend, set_cpu_fast_math
from .checkpoint import load_pretrained, save_pretrained
from .convert import accelerate
from .errors import CheckpointError, FastUNetError, ImageError, LimitError, NonFiniteInputWarning
from .export import export, export_dynamic_shapes, export_onnx
from .formats import load
from .graphs import CudaGraphRunner, GraphCaptureError, TrainStep, graph_train_step
from .guard import FusedPathWarning, FusedSupport, check_fused_support
from .limits import get_limit, set_limits
from .memory import saved_tensor_bytes
from .model import UNet
from .predict import predict
from .reference import PRESETS, DoubleConv, NearestConvUp, UNetReference
from .tuning import TuneReport, tune

__version__ = "0.1.0"

__all__ = [
    "UNet",
    "UNetReference",
    "load",
    "predict",
    "accelerate",
    "DoubleConv",
    "NearestConvUp",
    "PRESETS",
    "set_backend",
    "get_backend",
    "BACKENDS",
    "set_cpu_fast_math",
    "get_cpu_fast_math",
    "check_fused_support",
    "FusedSupport",
    "FusedPathWarning",
    "saved_tensor_bytes",
    "CudaGraphRunner",
    "graph_train_step",
    "TrainStep",
    "GraphCaptureError",
    "tune",
    "TuneReport",
    "export",
    "export_onnx",
    "export_dynamic_shapes",
    "save_pretrained",
    "load_pretrained",
    "FastUNetError",
    "CheckpointError",
    "ImageError",
    "LimitError",
    "NonFiniteInputWarning",
    "set_limits",
    "get_limit",
    "__version__",
]

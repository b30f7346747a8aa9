"""What the benchmark measures: ResNet-50's batch-norm sites (or r3d_18's, 3-D), the ops and modes, each
provider's callable, and the floor bytes every provider's effective bandwidth is computed from (docs/design.md's
two-pass floors)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fusedres.activations import eager_activation
from fusedres.ops import memory_format
from fusedres.report.kernel_report import (QUICK_SITES, R3D18_SITES, RESNET50_SITES,  # noqa: F401 (the sites)
                                           floor_element_bytes, site_shape)

OPS = ("batch_norm_relu", "batch_norm_add_relu", "add_relu")
# A frozen batch-norm's sites (torchvision's FrozenBatchNorm2d, detection backbones): the running statistics in every
# mode, gradients to the input and the residual only. Eager is torchvision's arithmetic.
FROZEN_OPS = ("frozen_batch_norm_relu", "frozen_batch_norm_add_relu")
MODES = ("inference", "train_forward", "backward", "forward_backward")
# The site tables the ops suite takes (--sites), and their --quick subsets.
SITES = {"resnet50": (RESNET50_SITES, QUICK_SITES), "r3d_18": (R3D18_SITES, R3D18_SITES[1::3])}


def unfrozen(op: str) -> str:
    """The op a frozen one is the eval mode of (its floors, its launches)."""
    return op.removeprefix("frozen_")


def op_label(op: str, activation: str) -> str:
    """The op's name in the results: batch_norm_relu, or batch_norm_silu, add_mish... for another activation."""
    return op if activation == "relu" else op.replace("relu", activation)


def is_frozen(op: str) -> bool:
    return op in FROZEN_OPS


# The ops suite's modes in terms of the kernel report's (whose floors are docs/design.md's): "backward" is the
# training backward, "forward_backward" both passes; add + ReLU has one forward. And back: the ops suite's mode
# (``mode_callable``) that times each of the report's (eval_backward: the backward of the op called with
# training=False), for the kernels suite.
_REPORT_MODES = {"inference": ("inference",), "train_forward": ("train_forward",), "backward": ("train_backward",),
                 "forward_backward": ("train_forward", "train_backward")}
_ADD_REPORT_MODES = {"inference": ("forward",), "train_forward": ("forward",), "backward": ("backward",),
                     "forward_backward": ("forward", "backward")}
_FROZEN_REPORT_MODES = {"inference": ("inference",), "train_forward": ("inference",), "backward": ("eval_backward",),
                        "forward_backward": ("inference", "eval_backward")}
TIMED_MODE = {"inference": "inference", "train_forward": "train_forward", "train_backward": "backward",
              "eval_backward": "backward", "forward": "inference", "backward": "backward",
              "recompute": "inference"}  # (save_memory's recomputation: the inference launch, batch statistics)


def floor_bytes(op: str, mode: str, shape: tuple[int, ...], dtype: torch.dtype, activation: str = "relu") -> int:
    """The bytes the fused two-pass design must move for ``op`` in ``mode`` (the kernel report's floors), the same
    count for every provider."""
    numel = 1
    for size in shape:
        numel *= size
    modes = (_ADD_REPORT_MODES if op == "add_relu" else _FROZEN_REPORT_MODES if is_frozen(op) else _REPORT_MODES)[mode]
    per_element = sum(floor_element_bytes(unfrozen(op), report_mode, activation) for report_mode in modes)
    return per_element * numel * torch.empty((), dtype=dtype).element_size()


def eager_op(op: str, training: bool, activation: str = "relu") -> Callable:
    """The eager PyTorch composition a user writes today (the baseline, and what torch.compile compiles)."""
    act = lambda z: eager_activation(activation, z)  # noqa: E731 (the expression a user writes; slope 0.01)
    if op == "frozen_batch_norm_relu":
        return lambda x, r, rm, rv, w, b: act(frozen_batch_norm(x, rm, rv, w, b))
    if op == "frozen_batch_norm_add_relu":
        return lambda x, r, rm, rv, w, b: act(frozen_batch_norm(x, rm, rv, w, b) + r)
    if op == "add_relu":
        return lambda x, r, rm, rv, w, b: act(x + r)
    if op == "batch_norm_relu":
        return lambda x, r, rm, rv, w, b: act(F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5))
    return lambda x, r, rm, rv, w, b: act(F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5) + r)


def frozen_batch_norm(x, rm, rv, w, b, eps: float = 1e-5):
    """torchvision's FrozenBatchNorm2d.forward, for any rank (fp32 buffers: a half input's output is fp32)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = w.reshape(shape) * (rv.reshape(shape) + eps).rsqrt()
    return x * scale + (b.reshape(shape) - rm.reshape(shape) * scale)


def fused_op(op: str, training: bool, activation: str = "relu") -> Callable:
    import fusedres.functional as FF  # imported late: the CLI decides on Triton's interpreter first

    if op == "add_relu":
        return lambda x, r, rm, rv, w, b: FF.add_act(x, r, activation=activation)
    residual = op in ("batch_norm_add_relu", "frozen_batch_norm_add_relu")
    if is_frozen(op):  # what FrozenBatchNormAct2d runs: the eval-mode op, in the promoted dtype as torchvision's
        from fusedres.modules import frozen_input

        return lambda x, r, rm, rv, w, b: FF.batch_norm_act(frozen_input(x, w), rm, rv, w, b, False,
                                                            residual=r if residual else None, activation=activation)
    return lambda x, r, rm, rv, w, b: FF.batch_norm_act(x, rm, rv, w, b, training, residual=r if residual else None,
                                                        activation=activation)


@dataclass
class OpInputs:
    x: torch.Tensor
    r: torch.Tensor
    rm: torch.Tensor
    rv: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    grad: torch.Tensor

    @property
    def args(self):
        return (self.x, self.r, self.rm, self.rv, self.w, self.b)

    @property
    def differentiable(self):
        return [t for t in (self.x, self.r, self.w, self.b) if t.requires_grad]

    def float64_copy(self) -> "OpInputs":
        """The same values in float64 (the reference both providers are measured against)."""
        copy = lambda t: t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
        return OpInputs(*(copy(t) for t in (self.x, self.r, self.rm, self.rv, self.w, self.b, self.grad)))


def make_inputs(shape, dtype, channels_last: bool, device, requires_grad: bool, seed: int = 0,
                frozen: bool = False) -> OpInputs:
    """The activations (channels-last: of the tensor's rank) and per-channel tensors (weight and bias frozen: no
    gradient) of one case."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    fmt = memory_format(len(shape), channels_last)

    def activation():
        t = torch.randn(shape, generator=generator).to(device=device, dtype=dtype, memory_format=fmt)
        return t.requires_grad_(requires_grad)

    c = shape[1]
    params = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    vec = lambda scale, shift: (torch.randn(c, generator=generator) * scale + shift).to(device, params)  # noqa
    return OpInputs(activation(), activation(), vec(0.1, 0.0), vec(0.1, 1.0).abs(),
                    vec(0.1, 1.0).requires_grad_(requires_grad and not frozen),
                    vec(0.1, 0.0).requires_grad_(requires_grad and not frozen),
                    activation().detach())


def no_grad_call(fn: Callable, *args, autocast=None) -> Callable:
    """A no-argument callable running ``fn(*args)`` without autograd (and under ``autocast`` when given)."""
    def run():
        with torch.no_grad(), (autocast or contextlib.nullcontext()):
            return fn(*args)
    return run


def mode_callable(fn: Callable, mode: str, inputs: OpInputs) -> Callable:
    """A no-argument callable running ``fn`` in ``mode`` on ``inputs``. ``backward`` times the backward alone:
    the forward runs once here and its graph is kept."""
    if mode in ("inference", "train_forward"):  # the two differ in the op's training flag, not here
        return no_grad_call(fn, *inputs.args)
    if mode == "forward_backward":
        return lambda: torch.autograd.grad(fn(*inputs.args), inputs.differentiable, inputs.grad,
                                           allow_unused=True)
    out = fn(*inputs.args)
    return lambda: torch.autograd.grad(out, inputs.differentiable, inputs.grad, retain_graph=True,
                                       allow_unused=True)

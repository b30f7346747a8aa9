"""Bad input: a clear error naming the function, what it expected and what it got; inputs and buffers untouched."""
from __future__ import annotations

import pytest
import torch

import fusedres.functional as FF
from tests.helpers import DEVICE, make_input, make_params


def _bn_args(dtype=torch.float32, param_dtype=None, shape=(2, 4, 3, 3)):
    x = make_input(shape, dtype)
    rm, rv, w, b = make_params(shape[1] if len(shape) > 1 else 4, param_dtype or dtype)
    return dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True)


def _with(fn, **changes):
    def build():
        args = _bn_args()
        if fn == "batch_norm_add_relu":
            args["residual"] = make_input(args["input"].shape, torch.float32)
        args.update({k: (v() if callable(v) else v) for k, v in changes.items()})
        return args
    return build


OTHER_DEVICE = torch.device("meta")
BAD = [
    ("batch_norm_relu", _with("batch_norm_relu", input=lambda: [1.0]), TypeError, "input to be a torch.Tensor"),
    ("batch_norm_relu", _with("batch_norm_relu", input=lambda: make_input((4,), torch.float32)), ValueError,
     "2 or more dimensions"),
    ("batch_norm_relu", _with("batch_norm_relu", input=lambda: torch.ones(2, 4, 3, 3, dtype=torch.int32,
                                                                          device=DEVICE)), TypeError, "int32"),
    ("batch_norm_relu", _with("batch_norm_relu", input=lambda: torch.ones(2, 4, 3, 3, dtype=torch.complex64,
                                                                          device=DEVICE)), TypeError, "complex64"),
    ("batch_norm_relu", _with("batch_norm_relu", weight=lambda: make_params(5, torch.float32)[2]), ValueError,
     r"weight of shape \(4,\)"),
    ("batch_norm_relu", _with("batch_norm_relu", running_mean=lambda: torch.zeros(4, device=OTHER_DEVICE)),
     ValueError, "running_mean is on meta"),
    ("batch_norm_relu", _with("batch_norm_relu", weight=lambda: make_params(4, torch.float16)[2]), TypeError,
     "weight has dtype torch.float16"),
    ("batch_norm_relu", lambda: _bn_args(torch.bfloat16, torch.float16), TypeError, "must be torch.bfloat16 or"),
    ("batch_norm_relu", lambda: {**_bn_args(torch.bfloat16, torch.float32),
                                 "bias": make_params(4, torch.bfloat16)[3]}, TypeError, "share one dtype"),
    ("batch_norm_relu", lambda: {**_bn_args(shape=(1, 4, 1, 1))}, ValueError,
     "Expected more than 1 value per channel when training"),
    ("batch_norm_relu", _with("batch_norm_relu", training=False, running_mean=None, running_var=None), ValueError,
     "evaluation mode"),
    ("batch_norm_relu", _with("batch_norm_relu", running_var=None), ValueError, "given together"),
    ("batch_norm_relu", _with("batch_norm_relu", momentum=None), TypeError, "momentum to be a float"),
    ("batch_norm_relu", _with("batch_norm_relu", training="yes"), TypeError, "training to be a bool"),
    ("batch_norm_add_relu", _with("batch_norm_add_relu", residual=lambda: make_input((2, 4, 3, 2), torch.float32)),
     ValueError, r"residual shape \(2, 4, 3, 2\) != input shape \(2, 4, 3, 3\)"),
    ("batch_norm_add_relu", _with("batch_norm_add_relu", residual=lambda: torch.ones(2, 4, 3, 3, dtype=torch.int64,
                                                                                     device=DEVICE)),
     TypeError, "residual of dtype"),
    ("batch_norm_add_relu", _with("batch_norm_add_relu", residual=lambda: torch.ones(2, 4, 3, 3,
                                                                                     device=OTHER_DEVICE)),
     ValueError, "residual is on meta"),
    ("batch_norm_add_relu", _with("batch_norm_add_relu", residual=None), TypeError, "residual to be a torch.Tensor"),
    ("add_relu", lambda: dict(input=make_input((3, 4), torch.float32), residual=make_input((4, 3), torch.float32)),
     ValueError, r"residual shape \(4, 3\) != input shape \(3, 4\)"),
    ("add_relu", lambda: dict(input=torch.ones(3, dtype=torch.int32, device=DEVICE),
                              residual=torch.ones(3, dtype=torch.int32, device=DEVICE)), TypeError, "int32"),
    ("add_relu", lambda: dict(input=make_input((3,), torch.float32), residual=torch.ones(3, device=OTHER_DEVICE)),
     ValueError, "residual is on meta"),
]


def _snapshot(args):
    return {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


@pytest.mark.parametrize("fn,build,error,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_clearly_and_touches_nothing(fn, build, error, message):
    args = build()
    before = _snapshot(args)
    with pytest.raises(error, match=message) as info:
        getattr(FF, fn)(**args)
    assert str(info.value).startswith(f"{fn}:"), f"the message must name the function: {info.value}"
    for name, value in before.items():
        assert torch.equal(args[name], value), f"{name} was modified by a failed call"

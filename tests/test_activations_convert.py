"""Every batch-norm + activation of torchvision's and timm's CNNs: fusedres.BatchNormAct2d against timm's, and
``convert`` on blocks with every activation (as a module or a function, before or after the residual add, the add
alone), on timm's and torchvision's own modules, and on whole models, against eager PyTorch in fp64."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres.functional import ACTIVATIONS
from tests.helpers import (DEVICE, FULL, MODEL_TOLERANCE, REFERENCE_ACTIVATIONS, assert_close, assert_models_match,
                           assert_within_eager_noise, make_input, randomize_batch_norms)

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# (act_layer, act_kwargs) as users write them -> the activation it is
ACT_LAYERS = [(nn.ReLU, None, "relu"), ("relu6", None, "relu6"), (nn.LeakyReLU, {"negative_slope": 0.1}, "leaky_relu"),
              ("swish", None, "silu"), (nn.SiLU, None, "silu"), (nn.GELU, None, "gelu"),
              ("gelu_tanh", None, "gelu_tanh"), ("hard_swish", None, "hardswish"), (nn.Hardswish, None, "hardswish"),
              (nn.Mish, None, "mish"), (None, None, "identity")]


@pytest.mark.parametrize("act_layer,act_kwargs,activation", ACT_LAYERS, ids=[a for _, _, a in ACT_LAYERS])
def test_batch_norm_act2d_matches_timms(act_layer, act_kwargs, activation):
    theirs = timm.layers.BatchNormAct2d(6, act_layer=act_layer, act_kwargs=dict(act_kwargs or {}),
                                        apply_act=act_layer is not None).double()
    ours = fusedres.BatchNormAct2d(6, act_layer=act_layer, act_kwargs=act_kwargs, apply_act=act_layer is not None,
                                   dtype=torch.float64)
    randomize_batch_norms(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.activation == activation
    for training in (True, False, True):
        ours.train(training)
        theirs.train(training)
        x = make_input((3, 6, 5, 4), torch.float64, channels_last=training)
        x_ref = x.clone().requires_grad_()
        x.requires_grad_()
        y, y_ref = ours(x), theirs(x_ref)
        assert_close(y, y_ref, f"output (training={training})")
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert_close(x.grad, x_ref.grad, "grad of input")
        assert_models_match(ours, theirs, f"training={training}")


def test_batch_norm_act2d_refuses_an_activation_it_cannot_fuse():
    with pytest.raises(ValueError, match="BatchNormAct2d: unsupported activation ELU; supported: identity, relu"):
        fusedres.BatchNormAct2d(4, act_layer=nn.ELU)
    with pytest.raises(ValueError, match="unsupported activation 'prelu'"):
        fusedres.BatchNormAct2d(4, act_layer="prelu")


def test_batch_norm_act2d_with_a_drop_layer_runs_the_activation_unfused_and_says_so():
    with pytest.warns(UserWarning, match="cannot be fused; this module runs the activation unfused"):
        module = fusedres.BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.0),
                                         dtype=torch.float64)
    randomize_batch_norms(module)
    reference = nn.BatchNorm2d(4, dtype=torch.float64)
    reference.load_state_dict(module.state_dict())
    x = make_input((2, 4, 3, 3), torch.float64)
    assert_close(module(x), F.silu(reference(x)), "output")


class _Block(nn.Module):
    """conv -> batch-norm -> activation (a module or a function), conv -> batch-norm -> [add] -> [activation]."""

    def __init__(self, activation: str, as_module: bool, add: bool, act_after_add: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.activation, self.as_module, self.add, self.act_after_add = activation, as_module, add, act_after_add
        self.act1 = _MODULES[activation]() if as_module else None

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = self.act1(out) if self.as_module else _FUNCTIONS[self.activation](out)
        out = self.bn2(self.conv2(out))
        if self.add:
            out = out + x
            if self.act_after_add:
                out = _FUNCTIONS[self.activation](out)
        return out


_MODULES = {"identity": None, "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": lambda: nn.LeakyReLU(0.2),
            "silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
            "hardswish": nn.Hardswish, "mish": nn.Mish}
_FUNCTIONS = {"relu": F.relu, "relu6": F.relu6, "leaky_relu": lambda z: F.leaky_relu(z, 0.2), "silu": F.silu,
              "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "hardswish": F.hardswish,
              "mish": F.mish}
_BLOCK_CASES = [(activation, index % 2 == 0, index % 3 != 2) for index, activation in enumerate(ACTIVATIONS)
                if activation != "identity"]


def _check_converted(fused, eager, shape, channels_last, what):
    for training in (True, False):
        fused.train(training)
        eager.train(training)
        x = make_input(shape, torch.float64, channels_last)
        torch.manual_seed(1)
        y = fused(x)
        torch.manual_seed(1)
        y_ref = eager(x)
        assert_close(y, y_ref, f"{what}: output (training={training})", tolerance=MODEL_TOLERANCE)
        if training:
            g = torch.randn_like(y)
            y.backward(g)
            y_ref.backward(g)
            assert_models_match(fused, eager, what, tolerance=MODEL_TOLERANCE)


@pytest.mark.parametrize("activation,as_module,act_after_add", _BLOCK_CASES, ids=[c[0] for c in _BLOCK_CASES])
def test_convert_fuses_every_activation_before_and_after_the_add(activation, as_module, act_after_add):
    eager = randomize_batch_norms(_Block(activation, as_module, True, act_after_add).double().to(DEVICE))
    fused = fusedres.convert(eager)
    report = fusedres.conversion_report(fused)
    plain, residual = ("batch_norm_relu", "batch_norm_add_relu") if activation == "relu" else \
        ("batch_norm_act", "batch_norm_add_act")
    assert report[plain] == ["bn1"]
    assert report[residual] == ["bn2"]
    assert fused.bn2.activation == (activation if act_after_add else "identity")
    _check_converted(fused, eager, (2, 6, 5, 4), as_module, activation)
    reverted = fusedres.revert(fused)
    assert type(reverted.bn1) is nn.BatchNorm2d and type(reverted.bn2) is nn.BatchNorm2d
    if as_module:
        assert type(reverted.act1) is type(eager.act1)


class _TimmNormActBlock(nn.Module):
    """Two convolutions with timm's BatchNormAct2d, the second without activation, then add and SiLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = timm.layers.BatchNormAct2d(8, apply_act=False)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + x)


def test_timm_batch_norm_act_converts_in_place_and_takes_the_add_after_it():
    eager = randomize_batch_norms(_TimmNormActBlock().double())
    fused = fusedres.convert(eager)
    report = fusedres.conversion_report(fused)
    assert report["batch_norm_act"] == ["bn1"] and report["batch_norm_add_act"] == ["bn2"]
    # bn2 on its own applies its act (the identity); the block's converted forward gives it the site's SiLU
    assert fused.bn2.activation == "identity" and fused.bn1.activation == "silu"
    # fusedres's and still timm's: timm's tools (freeze_batch_norm_2d, convert_sync_batchnorm) keep their act
    assert all(isinstance(m, fusedres.BatchNormAct2d) and isinstance(m, timm.layers.BatchNormAct2d)
               for m in (fused.bn1, fused.bn2))
    assert list(fused.state_dict()) == list(eager.state_dict())
    _check_converted(fused, eager, (2, 8, 5, 5), True, "a block of timm BatchNormAct2d")
    reverted = fusedres.revert(fused)
    assert type(reverted.bn1) is timm.layers.BatchNormAct2d and type(reverted.bn2) is timm.layers.BatchNormAct2d


def test_torchvision_conv_norm_activation_is_fused_by_swapping_modules():
    layer = torchvision.ops.Conv2dNormActivation(4, 6, activation_layer=nn.Hardswish)
    eager = randomize_batch_norms(nn.Sequential(layer, nn.Conv2d(6, 6, 1)).double())
    fused = fusedres.convert(eager)
    assert fusedres.conversion_report(fused)["batch_norm_act"] == ["0.1"]
    assert isinstance(fused[0][2], fusedres.modules.ActivationFusedAway)
    _check_converted(fused, eager, (2, 4, 5, 5), False, "Conv2dNormActivation")
    assert type(fusedres.revert(fused)[0][2]) is nn.Hardswish


def test_drop_path_between_batch_norm_and_add_stays_unfused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.drop_path = timm.layers.DropPath(0.2)

        def forward(self, x):
            return F.silu(self.drop_path(self.bn(self.conv(x))) + x)

    fused = fusedres.convert(Block())
    report = fusedres.conversion_report(fused)
    assert not any(report[key] for key in report if key != "not_analysed")


# Whole models: what each converts (fused sites by pattern, out of its batch-norms) is part of the contract, the
# README's table; every model trains a step and infers like eager in fp64. Each runs in the layout named here
# (both layouts are covered across the list, and across torchvision's and timm's models); FUSEDRES_ALL_LAYOUTS=1
# runs every model in both.
MODELS = {
    "torchvision mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10),
                                 dict(batch_norm_act=35, batch_norm_add_act=10), 52, "channels_last"),
    "torchvision mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
                                       dict(batch_norm_relu=5, batch_norm_act=18, batch_norm_add_act=6), 34, "nchw"),
    "torchvision efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10),
                                    dict(batch_norm_act=33), 49, "channels_last"),
    "torchvision regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(num_classes=10),
                                   dict(batch_norm_relu=33, batch_norm_add_relu=16), 53, "nchw"),
    "torchvision resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(num_classes=10),
                                    dict(batch_norm_relu=33, batch_norm_add_relu=16), 53, "channels_last"),
    "torchvision densenet121": (lambda: torchvision.models.densenet121(num_classes=10),
                                dict(batch_norm_relu=121), 121, "nchw"),
    "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10),
                             dict(batch_norm_act=40, batch_norm_add_act=9), 49, "channels_last"),
    "timm mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100", num_classes=10),
                                   dict(batch_norm_relu=5, batch_norm_act=23, batch_norm_add_act=6), 34, "nchw"),
    "timm regnety_002": (lambda: timm.create_model("regnety_002", num_classes=10),
                         dict(batch_norm_relu=27, batch_norm_act=17), 44, "channels_last"),
    "timm cspresnet50": (lambda: timm.create_model("cspresnet50", num_classes=10), dict(batch_norm_act=55), 55,
                         "nchw"),
    "timm resnet50d": (lambda: timm.create_model("resnet50d", num_classes=10),
                       dict(batch_norm_relu=35, batch_norm_add_relu=16), 55, "channels_last"),
}
_LAYOUTS = [(name, layout == "channels_last") for name, (_, _, _, layout) in MODELS.items()]
if os.environ.get("FUSEDRES_ALL_LAYOUTS") == "1":
    _LAYOUTS = [(name, channels_last) for name in MODELS for channels_last in (False, True)]


def _training_step(model, x, g):
    """Output, parameter gradients and buffers after one training step (the dropout masks seeded alike)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    y = model(x)
    y.backward(g)
    return {"output": y, **{f"grad of {n}": p.grad for n, p in model.named_parameters() if p.grad is not None},
            **{n: b for n, b in model.named_buffers() if b.dtype.is_floating_point}}


# The quick tier converts one of them (timm's MobileNetV3: timm's BatchNormAct2d, Hardswish, the add alone); the
# others take 10-70 s each in the interpreter: --full.
QUICK_MODEL = "timm mobilenetv3_small_100"


@pytest.mark.parametrize("name,channels_last", [pytest.param(n, c, marks=() if n == QUICK_MODEL else FULL)
                                                for n, c in _LAYOUTS],
                         ids=[f"{n}-{'cl' if c else 'nchw'}" for n, c in _LAYOUTS])
def test_models_convert_and_match_eager(name, channels_last):
    factory, expected, batch_norms, _ = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's and torchvision's own deprecation notices
        eager = randomize_batch_norms(factory().double().to(DEVICE))
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last)
    perturbed_eager = copy.deepcopy(eager)
    fused = fusedres.convert(eager)
    report = fusedres.conversion_report(fused)
    counts = {key: len(names) for key, names in report.items() if key != "not_analysed" and names}
    assert counts == expected, f"{name}: fused {counts}, expected {expected}"
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in eager.modules()) == batch_norms
    x = make_input((2, 3, 32, 32), torch.float64, channels_last)
    g = torch.randn(2, 10, dtype=torch.float64, device=DEVICE)
    fused_step, eager_step = _training_step(fused, x, g), _training_step(eager, x, g)
    perturbed_step = _training_step(perturbed_eager, x * (1 + 2.0**-48), g)
    assert_within_eager_noise(fused_step, eager_step, perturbed_step, f"{name} (a training step)")
    fused.eval()
    eager.eval()
    with torch.no_grad():
        assert_close(fused(x), eager(x), f"{name}: output in eval mode", tolerance=MODEL_TOLERANCE)


def test_unknown_activation_names_are_refused_by_the_functions():
    x = make_input((2, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="batch_norm_act: unsupported activation 'swish'"):
        fusedres.functional.batch_norm_act(x, None, None, training=True, activation="swish")
    assert set(REFERENCE_ACTIVATIONS) == set(ACTIVATIONS)

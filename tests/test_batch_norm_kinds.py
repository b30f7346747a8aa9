"""Every batch-norm kind of torchvision's and timm's zoo: 1-D and 3-D (BatchNormAct1d / 3d, BatchNormReLU1d / 3d),
``bias=False``, and frozen batch-norms (FrozenBatchNormAct2d; torchvision's FrozenBatchNorm2d and timm's
FrozenBatchNormAct2d converted), against eager PyTorch on fp64 copies. Models with these kinds: the bottom of
this file."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from tests.helpers import (DEVICE, FULL, MODEL_TOLERANCE, assert_close, assert_within_eager_noise,
                           channels_last_style, fp64_copy, make_input, randomize_batch_norms)

try:  # (the frozen batch-norm and the zoo need torchvision; PyTorch's own samples do not)
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:
    torchvision = FrozenBatchNorm2d = None
needs_torchvision = pytest.mark.skipif(torchvision is None, reason="torchvision is not installed")

FUSED_BY_RANK = {nn.BatchNorm1d: (fusedres.BatchNormReLU1d, fusedres.BatchNormAct1d),
                 nn.BatchNorm2d: (fusedres.BatchNormReLU2d, fusedres.BatchNormAct2d),
                 nn.BatchNorm3d: (fusedres.BatchNormReLU3d, fusedres.BatchNormAct3d)}


# --- PyTorch's own ModuleInfo samples for nn.BatchNorm1d / 2d / 3d -------------------------------------------

def _module_info_samples():
    """(class, training, constructor args, kwargs, input shape, description) of PyTorch's ModuleInfo samples
    (``torch.testing._internal.common_modules``; it needs ``expecttest``, a test dependency)."""
    try:
        from torch.testing._internal.common_modules import module_db
    except ImportError as error:  # (the GPU machine may lack expecttest: the CPU suite runs these)
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"PyTorch's ModuleInfo unavailable: {error}"))]
    samples = []
    for info in module_db:
        if info.module_cls not in FUSED_BY_RANK:
            continue
        for training in (True, False):
            for sample in info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                                  training=training):
                constructor, forward = sample.constructor_input, sample.forward_input
                samples.append(pytest.param(
                    (info.module_cls, training, constructor.args, constructor.kwargs, tuple(forward.args[0].shape)),
                    id=f"{info.module_cls.__name__}-{'train' if training else 'eval'}-{sample.desc or 'default'}"))
    return samples


@pytest.mark.parametrize("activation", ["relu", pytest.param("silu", marks=FULL)])  # (--full: the samples again)
@pytest.mark.parametrize("sample", _module_info_samples())
def test_pytorch_module_info_samples_match_eager(sample, activation):
    """The fused module built with nn.BatchNorm*d's constructor arguments: its state_dict, and over two steps (the
    cumulative average counts batches) its output, input and parameter gradients, and buffers, against the nn
    module followed by the activation, in fp64."""
    kind, training, args, kwargs, shape = sample
    relu_class, act_class = FUSED_BY_RANK[kind]
    reference = randomize_batch_norms(kind(*args, **kwargs).double().to(DEVICE))
    fused = (relu_class(*args, **kwargs) if activation == "relu"
             else act_class(*args, act_layer=nn.SiLU, **kwargs)).double().to(DEVICE)
    assert list(fused.state_dict()) == list(reference.state_dict())
    fused.load_state_dict(reference.state_dict())
    assert isinstance(fused, kind) and fused.activation == activation
    reference.train(training)
    fused.train(training)
    eager_activation = F.relu if activation == "relu" else F.silu
    for step in range(2):
        x = make_input(shape, torch.float64).requires_grad_()
        x_ref = fp64_copy(x, requires_grad=True)
        y, y_ref = fused(x), eager_activation(reference(x_ref))
        assert_close(y, y_ref, f"output, step {step}")
        if not y.numel():
            continue
        grad = make_input(shape, torch.float64, shift=0.0)
        y.backward(grad)
        y_ref.backward(grad)
        assert_close(x.grad, x_ref.grad, f"grad of input, step {step}")
        for (name, p), p_ref in zip(fused.named_parameters(), reference.parameters()):
            assert_close(p.grad, p_ref.grad, f"grad of {name}, step {step}")
        for (name, b), b_ref in zip(fused.named_buffers(), reference.buffers()):
            if b.is_floating_point():
                assert_close(b, b_ref, f"{name}, step {step}")
            else:
                assert torch.equal(b, b_ref), f"{name}, step {step}: {b} != {b_ref}"


@pytest.mark.parametrize("kind", list(FUSED_BY_RANK), ids=lambda k: k.__name__)
def test_bias_false_has_nn_state_dict_and_output(kind):
    relu_class, act_class = FUSED_BY_RANK[kind]
    reference = kind(6, bias=False)
    for fused in (relu_class(6, bias=False), act_class(6, bias=False, act_layer=nn.Identity)):
        assert fused.bias is None and fused.weight is not None
        assert list(fused.state_dict()) == list(reference.state_dict()) == ["weight", "running_mean", "running_var",
                                                                             "num_batches_tracked"]
    fused = fusedres.BatchNormReLU2d(6, bias=False).double().to(DEVICE)
    reference = nn.BatchNorm2d(6, bias=False).double().to(DEVICE)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
    fused.load_state_dict(reference.state_dict())
    x = make_input((3, 6, 5, 4), torch.float64)
    assert_close(fused(x), F.relu(reference(x)), "BatchNormReLU2d(bias=False)")


def test_fused_ranks_check_their_input_dim_as_nn_does():
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        fusedres.BatchNormReLU1d(4)(make_input((2, 4, 3, 3), torch.float32))
    with pytest.raises(ValueError, match="expected 5D input"):
        fusedres.BatchNormAct3d(4)(make_input((2, 4, 3, 3), torch.float32))
    with pytest.raises(ValueError, match="expected 4D input"):
        fusedres.FrozenBatchNormAct2d(4)(make_input((2, 4, 3), torch.float32))


@pytest.mark.parametrize("kind,shape", [(nn.BatchNorm1d, (6, 5, 7)), (nn.BatchNorm1d, (9, 5)),
                                        (nn.BatchNorm3d, (2, 5, 3, 4, 6))], ids=["1d-ncl", "1d-nc", "3d"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_modules_read_every_layout_of_their_rank(kind, shape, training):
    """Channels-last-style inputs of each rank (a transposed (N, L, C) view, channels_last_3d): eager's values and
    eager's output strides (contiguous for 2-D and 3-D inputs, channels_last_3d kept)."""
    relu_class, _ = FUSED_BY_RANK[kind]
    reference = randomize_batch_norms(kind(shape[1])).double().to(DEVICE).train(training)
    fused = relu_class(shape[1]).double().to(DEVICE).train(training)
    fused.load_state_dict(reference.state_dict())
    x = channels_last_style(make_input(shape, torch.float64)).requires_grad_()
    x_ref = fp64_copy(x, requires_grad=True)
    y, y_ref = fused(x), F.relu(reference(x_ref))
    assert y.stride() == y_ref.stride()
    assert_close(y, y_ref, "output")
    grad = make_input(shape, torch.float64, shift=0.0)
    y.backward(grad)
    y_ref.backward(grad)
    assert_close(x.grad, x_ref.grad, "grad of input")
    assert_close(fused.running_mean, reference.running_mean, "running_mean")


# --- Frozen batch-norm --------------------------------------------------------------------------------------

def _frozen(channels, act_layer=nn.ReLU, cls=fusedres.FrozenBatchNormAct2d, **kwargs):
    return randomize_batch_norms(cls(channels, act_layer=act_layer, **kwargs).to(DEVICE))


@needs_torchvision
@pytest.mark.parametrize("dtype,buffers", [(torch.float32, "input"), (torch.bfloat16, "float32"),
                                           (torch.float16, "float32"), (torch.bfloat16, "input"),
                                           (torch.float64, "input")])
@pytest.mark.parametrize("activation,act_layer", [("relu", nn.ReLU),  # (--full: the other activations)
                                                  pytest.param("hardswish", nn.Hardswish, marks=FULL),
                                                  pytest.param("identity", nn.Identity, marks=FULL)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, pytest.param(True, marks=FULL)])  # (--full: channels_last too)
def test_frozen_batch_norm_act_matches_torchvisions_arithmetic(dtype, buffers, activation, act_layer, residual,
                                                               channels_last):
    """In training mode too: statistics and affine frozen, gradients to the input and the residual only, nothing
    written to the buffers; against torchvision's own FrozenBatchNorm2d (scale = w * (rv + eps).rsqrt(), bias =
    b - rm * scale) in fp64, and with its output dtype: fp32 buffers (autocast's) make a half input's output fp32."""
    fused = _frozen(7, act_layer, eps=1e-3)
    if buffers == "input":  # a model cast to the input's dtype
        fused = fused.to(dtype)
    fused.train()
    original = FrozenBatchNorm2d(7, eps=1e-3).to(DEVICE).to(fused.weight.dtype)
    original.load_state_dict(fused.state_dict())
    reference = copy.deepcopy(original).double()
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    x = make_input((3, 7, 5, 6), dtype, channels_last).requires_grad_()
    r = make_input((3, 7, 5, 6), dtype, channels_last).requires_grad_() if residual else None
    y = fused(x, r)
    with torch.no_grad():
        assert y.dtype == act_layer()(original(x) + (r if residual else 0)).dtype
    x_ref = fp64_copy(x, requires_grad=True)
    r_ref = fp64_copy(r, requires_grad=True) if residual else None
    y_ref = act_layer()(reference(x_ref) + (r_ref if residual else 0))
    assert_close(y, y_ref, "output")
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad = make_input(y.shape, y.dtype, channels_last, shift=0.0)
    y.backward(grad)
    y_ref.backward(grad.double())
    assert x.grad.dtype == dtype
    assert_close(x.grad, x_ref.grad, "grad of input", dtype=dtype)
    if residual:
        assert_close(r.grad, r_ref.grad, "grad of residual", dtype=dtype)
    for name, value in fused.state_dict().items():
        assert torch.equal(value, state[name]) and value.grad is None and not value.requires_grad, name


@needs_torchvision
def test_frozen_batch_norm_act_state_dict_is_torchvisions():
    fused, reference = _frozen(5), FrozenBatchNorm2d(5)
    assert list(fused.state_dict()) == list(reference.state_dict())
    state = {**fused.state_dict(), "num_batches_tracked": torch.tensor(3)}  # a trainable batch-norm's checkpoint
    reference.load_state_dict(state)
    fusedres.FrozenBatchNormAct2d(5).load_state_dict(state)


class _FrozenBlock(nn.Module):
    """A detection backbone's basic block: frozen batch-norms, ReLU modules, the add."""

    def __init__(self, channels=6):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(channels)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


@needs_torchvision
def test_torchvision_frozen_batch_norms_convert_keep_their_class_and_revert():
    model = randomize_batch_norms(_FrozenBlock()).double().to(DEVICE)
    eager = copy.deepcopy(model)
    fused = fusedres.convert(model)
    report = fusedres.conversion_report(fused)
    assert (report["batch_norm_relu"], report["batch_norm_add_relu"]) == (["bn1"], ["bn2"])
    for name in ("bn1", "bn2"):
        bn = getattr(fused, name)
        assert isinstance(bn, FrozenBatchNorm2d) and isinstance(bn, fusedres.FrozenBatchNormAct2d)
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = make_input((2, 6, 5, 5), torch.float64).requires_grad_()
    x_ref = fp64_copy(x, requires_grad=True)
    y, y_ref = fused(x), eager(x_ref)
    assert_close(y, y_ref, "output", tolerance=MODEL_TOLERANCE)
    y.sum().backward()
    y_ref.sum().backward()
    assert_close(x.grad, x_ref.grad, "grad of input", tolerance=MODEL_TOLERANCE)
    for (name, p), p_ref in zip(fused.named_parameters(), eager.parameters()):
        assert_close(p.grad, p_ref.grad, f"grad of {name}", tolerance=MODEL_TOLERANCE)
    for (name, b), b_ref in zip(fused.named_buffers(), eager.buffers()):
        assert torch.equal(b, b_ref), f"{name} was written"
    reverted = fusedres.revert(fused)
    assert type(reverted.bn1) is FrozenBatchNorm2d and type(reverted.bn2) is FrozenBatchNorm2d
    # frozen batch-norms have no batch statistics: convert_sync_batchnorm leaves them as they are
    synced = fusedres.convert_sync_batchnorm(fusedres.convert(eager))
    assert isinstance(synced.bn1, fusedres.FrozenBatchNormAct2d) and type(synced.bn1) is type(fused.bn1)


@needs_torchvision
def test_timm_frozen_batch_norm_act_converts_in_place():
    timm_layers = pytest.importorskip("timm.layers")
    frozen = timm_layers.FrozenBatchNormAct2d(4, act_layer=nn.SiLU)
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), frozen)).double().to(DEVICE)
    eager = copy.deepcopy(model)
    fused = fusedres.convert(model)
    assert isinstance(fused[1], timm_layers.FrozenBatchNormAct2d) and isinstance(fused[1], fusedres.BatchNormAct)
    assert fusedres.conversion_report(fused)["batch_norm_act"] == ["1"]
    x = make_input((2, 3, 6, 6), torch.float64)
    assert_close(fused(x), eager(x), "timm FrozenBatchNormAct2d, converted", tolerance=MODEL_TOLERANCE)
    assert type(fusedres.revert(fused)[1]) is timm_layers.FrozenBatchNormAct2d


# --- 1-D and 3-D sites in small models --------------------------------------------------------------------

class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.fc2, self.bn2 = nn.Linear(16, 16), nn.BatchNorm1d(16)

    def forward(self, x):
        h = torch.relu(self.bn1(self.fc1(x)))
        return F.relu(self.bn2(self.fc2(h)) + h)


@pytest.mark.parametrize("make,shape,expected", [
    (_MLP, (6, 8), dict(batch_norm_relu=1, batch_norm_add_relu=1)),
    (lambda: nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.SiLU()), (2, 3, 9), dict(batch_norm_act=1)),
    (lambda: nn.Sequential(nn.Conv3d(3, 5, 3), nn.BatchNorm3d(5), nn.Hardswish()), (2, 3, 4, 6, 6),
     dict(batch_norm_act=1)),
], ids=["bn1d_relu_mlp", "conv1d_bn1d_silu", "conv3d_bn3d_hardswish"])
def test_one_and_three_d_sites_convert(make, shape, expected):
    torch.manual_seed(0)
    eager = randomize_batch_norms(make()).double().to(DEVICE)
    fused = fusedres.convert(eager)
    counts = {k: len(v) for k, v in fusedres.conversion_report(fused).items() if v and k != "not_analysed"}
    assert counts == expected
    x = make_input(shape, torch.float64)
    g = make_input(copy.deepcopy(eager)(x).shape, torch.float64, shift=0.0)
    fused_step, eager_step = _training_step(fused, x, g), _training_step(eager, x, g)
    for name, value in eager_step.items():
        assert_close(fused_step[name], value, f"{name} after a training step", tolerance=MODEL_TOLERANCE)


def _training_step(model, x, g):
    model.train()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(g)
    return {"output": y, **{f"grad of {n}": p.grad for n, p in model.named_parameters() if p.grad is not None},
            **{n: b for n, b in model.named_buffers() if b.dtype.is_floating_point}}


# --- Models of the zoo: README's table (detection, segmentation, video) -------------------------------------

def _detection_backbone():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                               trainable_layers=3)


def _detector():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    backbone = _resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)
    return FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64)


# name -> (factory, expected report counts, input shape or None (conversion only), what the output is)
ZOO = {
    "resnet18 FrozenBatchNorm2d": (lambda: torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d),
                                   dict(batch_norm_relu=9, batch_norm_add_relu=8), (2, 3, 32, 32)),
    "resnet_fpn_backbone FrozenBatchNorm2d": (_detection_backbone, dict(batch_norm_relu=33, batch_norm_add_relu=16),
                                              (1, 3, 64, 64)),
    "fasterrcnn_resnet50_fpn FrozenBatchNorm2d": (_detector, dict(batch_norm_relu=33, batch_norm_add_relu=16),
                                                  None),
    "deeplabv3_resnet50": (lambda: torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=4), dict(batch_norm_relu=40, batch_norm_add_relu=16),
        (2, 3, 32, 32)),
    "lraspp_mobilenet_v3_large": (lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4),
        dict(batch_norm_relu=12, batch_norm_act=20, batch_norm_add_act=10), (2, 3, 32, 32)),
    "r3d_18": (lambda: torchvision.models.video.r3d_18(num_classes=10),
               dict(batch_norm_relu=9, batch_norm_add_relu=8), (2, 3, 4, 16, 16)),
    "r2plus1d_18": (lambda: torchvision.models.video.r2plus1d_18(num_classes=10),
                    dict(batch_norm_relu=26, batch_norm_add_relu=8), (2, 3, 4, 16, 16)),
    # (its features, where all its batch-norms are: the head's pooling needs 224x224 clips)
    "s3d": (lambda: torchvision.models.video.s3d(num_classes=10).features, dict(batch_norm_relu=77),
            (2, 3, 8, 32, 32)),
}


def _build(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's own notices
        return randomize_batch_norms(ZOO[name][0]()).double().to(DEVICE)


@needs_torchvision
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_fuse_their_batch_norm_sites(name):
    fused = fusedres.convert(_build(name), inplace=True)
    report = fusedres.conversion_report(fused)
    counts = {k: len(v) for k, v in report.items() if v and k != "not_analysed"}
    assert counts == ZOO[name][1] and report["not_analysed"] == []


def _outputs(y):
    """The tensors of a model's output (segmentation models return a dict)."""
    return {k: v for k, v in y.items()} if isinstance(y, dict) else {"out": y}


@needs_torchvision
@FULL  # (whole models in the interpreter: 5-60 s each)
@pytest.mark.parametrize("name", [n for n, (_, _, shape) in ZOO.items() if shape is not None])
def test_zoo_models_train_and_infer_like_eager(name):
    """A training step within eager's own sensitivity (frozen batch-norms: buffers untouched), then inference
    against eager in fp64."""
    eager = _build(name)
    shape = ZOO[name][2]
    channels_last = len(shape) == 5  # video models in channels_last_3d, the others in NCHW
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last_3d)
    perturbed = copy.deepcopy(eager)
    fused = fusedres.convert(eager)
    frozen_before = {n: b.clone() for n, b in fused.named_buffers()}
    x = make_input(shape, torch.float64, channels_last)

    def step(model, x):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the dropout masks alike
        outputs = _outputs(model(x))
        sum(out.sum() * (i + 1) for i, out in enumerate(outputs.values())).backward()
        return {**{f"output {k}": v for k, v in outputs.items()},
                **{f"grad of {n}": p.grad for n, p in model.named_parameters() if p.grad is not None},
                **{n: b for n, b in model.named_buffers() if b.dtype.is_floating_point}}

    fused_step, eager_step = step(fused, x), step(eager, x)
    assert_within_eager_noise(fused_step, eager_step, step(perturbed, x * (1 + 2.0**-48)), f"{name} (a step)")
    for n, module in fused.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(getattr(module, buffer), frozen_before[f"{n}.{buffer}"]), f"{n}.{buffer} written"
    fused.eval()
    eager.eval()
    with torch.no_grad():
        for key, out in _outputs(fused(x)).items():
            assert_close(out, _outputs(eager(x))[key], f"{name}: {key} in eval mode", tolerance=MODEL_TOLERANCE)


@needs_torchvision
@FULL  # (a whole detector: ~30 s)
def test_whole_detector_with_frozen_backbone_infers_like_eager():
    eager = _build("fasterrcnn_resnet50_fpn FrozenBatchNorm2d").eval()
    fused = fusedres.convert(eager)
    images = [make_input((3, 64, 64), torch.float64, shift=0.0).abs() for _ in range(2)]
    with torch.no_grad():
        fused_features = fused.backbone(fused.transform(images)[0].tensors)
        eager_features = eager.backbone(eager.transform(images)[0].tensors)
        for key, value in eager_features.items():
            assert_close(fused_features[key], value, f"FPN level {key}", tolerance=MODEL_TOLERANCE)
        detections = list(zip(fused(images), eager(images)))
    for fused_out, eager_out in detections:
        assert torch.equal(fused_out["labels"], eager_out["labels"])
        for key in ("boxes", "scores"):
            assert_close(fused_out[key], eager_out[key], f"detections: {key}", tolerance=MODEL_TOLERANCE)

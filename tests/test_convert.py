"""fusedres.convert / revert / conversion_report on torchvision, timm, the seed's models and users' own blocks."""
from __future__ import annotations

import copy
import os
import pathlib
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres.modules import ActivationFusedAway, BatchNormReLU2d
from tests import seed_reference as seed
from tests.helpers import (DEVICE, FULL, MODEL_TOLERANCE, assert_close, assert_models_match, make_input,
                           randomize_batch_norms)

torchvision = pytest.importorskip("torchvision")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kwargs)


# (ResNet-50's Bottleneck, ResNeXt's, ResNet-D's and eight more CNNs: tests/test_activations_convert.py.)
MODELS = {
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 48, 48)),
    "timm_resnet18": (lambda: _timm("resnet18", num_classes=10), (2, 3, 48, 48)),
    "seed_small_resnet": (lambda: seed.SmallResNet(), (2, 3, 16, 16)),
}


def _count_batch_norm_calls(monkeypatch):
    calls = []
    original = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


# The quick tier trains the seed's SmallResNet; torchvision's and timm's resnet18 (40-60 s each) are --full.
@pytest.mark.parametrize("name,channels_last", [pytest.param("torchvision_resnet18", False, marks=FULL),
                                                 pytest.param("timm_resnet18", True, marks=FULL),
                                                 pytest.param("seed_small_resnet", False, marks=FULL),
                                                 ("seed_small_resnet", True)])
def test_converted_models_match_eager(name, channels_last, monkeypatch):
    """Outputs, every parameter's gradient and the running statistics over training steps, then eval; fp64 so
    that the comparison is the conversion's, not rounding compounded over many layers."""
    make, shape = MODELS[name]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    reference = randomize_batch_norms(make()).to(DEVICE, torch.float64, memory_format=fmt)
    fused = fusedres.convert(reference)
    unfused_sites = sum(type(m) is nn.BatchNorm2d for m in fused.modules())  # the shortcut projections
    calls = _count_batch_norm_calls(monkeypatch)
    for step, training in enumerate([True, True, False]):
        fused.train(training)
        reference.train(training)
        x = make_input(shape, torch.float64, channels_last)
        calls.clear()
        y = fused(x)
        assert len(calls) == unfused_sites, "a converted site still ran eager batch_norm"
        y_ref = reference(x)
        assert_close(y, y_ref, f"{name} output, step {step}", tolerance=MODEL_TOLERANCE)
        grad = make_input(y.shape, torch.float64, shift=0.0)
        y.backward(grad)
        y_ref.backward(grad)
        assert_models_match(fused, reference, f"{name} step {step}", tolerance=MODEL_TOLERANCE)
        for model in (fused, reference):
            with torch.no_grad():
                for param in model.parameters():
                    param -= 1e-3 * param.grad
                    param.grad = None


@pytest.mark.parametrize("make,relu_sites,add_sites", [
    (torchvision.models.resnet18, 9, 8), (torchvision.models.resnet34, 17, 16),
    (torchvision.models.resnet50, 33, 16), (torchvision.models.resnet101, 67, 33),
    (torchvision.models.resnet152, 101, 50), (torchvision.models.resnext50_32x4d, 33, 16),
    (torchvision.models.wide_resnet50_2, 33, 16),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_torchvision_resnet_site_is_fused(make, relu_sites, add_sites):
    model = fusedres.convert(make(), inplace=True)
    report = fusedres.conversion_report(model)
    assert (len(report["batch_norm_relu"]), len(report["batch_norm_add_relu"])) == (relu_sites, add_sites)
    assert report["not_analysed"] == []
    last = "bn2" if relu_sites == add_sites + 1 else "bn3"  # basic blocks / bottlenecks
    assert "bn1" in report["batch_norm_relu"] and f"layer1.0.{last}" in report["batch_norm_add_relu"]
    block = model.layer1[0]
    assert isinstance(block, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck))
    assert type(block.downsample[1] if block.downsample is not None else block.bn1) in (nn.BatchNorm2d,
                                                                                        BatchNormReLU2d)


# The quick tier converts timm's resnet18; each variant after it (3-11 s) is --full.
TIMM_RESNETS_FULL_TIER = [
    ("resnet50", {}, 33, 16), ("resnet50d", {}, 35, 16),
    # drop-path between bn2 and the add: only the first block (rate 0) fuses bn2 + add; where a projection
    # shortcut exists its batch-norm takes the add instead, exactly
    ("resnet18", {"drop_path_rate": 0.1}, 9, ["layer1.0.bn2", "layer2.0.downsample.1", "layer3.0.downsample.1",
                                             "layer4.0.downsample.1"]),
    # drop-block between bn2 and its ReLU in layer3 and layer4 (9 blocks): those bn2 stay unfused
    ("resnet50", {"drop_block_rate": 0.1}, 33 - 9, 16),
    # squeeze-excitation between bn2 and the add: only the projection shortcuts' batch-norms take the add
    ("seresnet18", {}, 9, ["layer2.0.downsample.1", "layer3.0.downsample.1", "layer4.0.downsample.1"]),
    # anti-aliasing pools after act2: every site stays fusable
    ("resnetaa50", {}, 33, 16),
]


@pytest.mark.parametrize("name,kwargs,relu_sites,add_sites",
                         [("resnet18", {}, 9, 8), *(pytest.param(*case, marks=FULL) for case in
                                                    TIMM_RESNETS_FULL_TIER)])
def test_timm_resnets_convert_where_exact(name, kwargs, relu_sites, add_sites):
    model = randomize_batch_norms(_timm(name, num_classes=10, **kwargs)).to(torch.float64).eval()
    fused = fusedres.convert(model)
    report = fusedres.conversion_report(fused)
    assert len(report["batch_norm_relu"]) == relu_sites
    if isinstance(add_sites, list):
        assert report["batch_norm_add_relu"] == add_sites
    else:
        assert len(report["batch_norm_add_relu"]) == add_sites
    assert isinstance(fused.layer1[0], type(model.layer1[0]))
    x = make_input((2, 3, 32, 32), torch.float64)
    assert_close(fused(x), model(x), f"timm {name} {kwargs} eval output", tolerance=MODEL_TOLERANCE)


class UserBlock(nn.Module):
    """Written like the seed's BasicBlock, with its own names and functional ReLUs."""

    def __init__(self, c):
        super().__init__()
        self.conv_a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm_a = nn.BatchNorm2d(c)
        self.conv_b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm_b = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.norm_a(self.conv_a(x)))
        return torch.relu(x + self.norm_b(self.conv_b(h)))


class DataDependentBlock(nn.Module):
    """Cannot be traced: control flow on a tensor's value."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x):
        if x.sum() > 0:
            return torch.relu(self.norm(x))
        return self.norm(x)


class TrainingSwitchBlock(nn.Module):
    """Reads self.training: a trace would freeze it, so its forward is not rewritten."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.norm(x) + (x if self.training else 0.5 * x))


def test_user_blocks_are_recognised_by_what_they_compute():
    model = randomize_batch_norms(nn.Sequential(UserBlock(4), seed.BasicBlock(4), DataDependentBlock(4),
                                                TrainingSwitchBlock(4), nn.BatchNorm2d(4), nn.ReLU()))
    model = model.to(torch.float64)
    fused = fusedres.convert(model)
    report = fusedres.conversion_report(fused)
    assert report["batch_norm_relu"] == ["0.norm_a", "1.residual.1", "4"]
    assert report["batch_norm_add_relu"] == ["0.norm_b", "1.residual.4"]
    assert len(report["not_analysed"]) == 2
    assert report["not_analysed"][0].startswith("2 (DataDependentBlock): not traceable")
    assert report["not_analysed"][1].startswith("3.norm (TrainingSwitchBlock): left unfused")
    assert isinstance(fused[0], UserBlock) and type(fused[0]) is not UserBlock
    assert isinstance(fused[5], ActivationFusedAway) and type(fused[4]) is BatchNormReLU2d
    for training in (True, False):
        fused.train(training)
        model.train(training)
        x = make_input((2, 4, 5, 5), torch.float64)
        assert_close(fused(x), model(x), f"output, training={training}")


def test_inplace_false_leaves_the_model_and_inplace_true_keeps_its_parameters():
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    fused = fusedres.convert(model)
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p is not q for p, q in zip(model.parameters(), fused.parameters()))

    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    same = fusedres.convert(model, inplace=True)
    assert same is model and all(p is q for p, q in zip(params, model.parameters()))
    x = make_input((2, 3, 32, 32), torch.float32)
    model(x).sum().backward()
    optimizer.step()
    assert not torch.equal(model.fc.weight, before["fc.weight"]), "the optimizer built before conversion works"


def test_modes_devices_dtypes_and_flags_are_kept():
    model = torchvision.models.resnet18(num_classes=10).eval().to(torch.float16)
    model = model.to(memory_format=torch.channels_last)
    model.layer1.requires_grad_(False)
    fused = fusedres.convert(model)
    assert not fused.training and not any(m.training for m in fused.modules())
    assert all(p.dtype == torch.float16 for p in fused.parameters())
    assert fused.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert [p.requires_grad for p in fused.parameters()] == [p.requires_grad for p in model.parameters()]
    # converting before .to() works too: the rewritten forwards look modules up at call time
    late = fusedres.convert(torchvision.models.resnet18(num_classes=10)).to(torch.float64).train()
    assert all(p.dtype == torch.float64 for p in late.parameters()) and late.layer1[0].bn1.training
    late(make_input((2, 3, 32, 32), torch.float64)).sum().backward()


def test_state_dicts_round_trip_between_converted_reverted_and_plain(tmp_path):
    plain = randomize_batch_norms(torchvision.models.resnet18(num_classes=10))
    fused = fusedres.convert(plain)
    reverted = fusedres.revert(fused)
    for model in (fused, reverted):
        assert model.state_dict().keys() == plain.state_dict().keys()
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (BatchNormReLU2d, ActivationFusedAway)) for m in reverted.modules())
    assert type(reverted.layer1[0]) is torchvision.models.resnet.BasicBlock and type(reverted.relu) is nn.ReLU
    torch.save(fused.state_dict(), tmp_path / "fused.pt")
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(torch.load(tmp_path / "fused.pt"))
    into_fused = fusedres.convert(torchvision.models.resnet18(num_classes=10))
    into_fused.load_state_dict(plain.state_dict())
    x = make_input((2, 3, 32, 32), torch.float32)
    for model in (fused, reverted, fresh, into_fused, plain):
        model.eval()
    expected = plain(x).double()
    for what, model in (("converted", fused), ("reverted", reverted), ("loaded plain", fresh),
                        ("loaded converted", into_fused)):
        assert_close(model(x), expected, f"{what} output")


@FULL
def test_converted_models_deepcopy_and_pickle_in_a_new_process(tmp_path):
    """(--full: a second Python process, importing torch afresh, takes most of its 8-12 s.)"""
    fused = fusedres.convert(randomize_batch_norms(torchvision.models.resnet18(num_classes=10))).eval()
    x = make_input((1, 3, 32, 32), torch.float32)
    assert_close(copy.deepcopy(fused)(x), fused(x).double(), "deep copy output")
    torch.save({"model": fused, "x": x, "y": fused(x)}, tmp_path / "model.pt")
    code = ("import torch, fusedres\n"
            f"saved = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
            "model = saved['model']\n"
            "assert type(model.layer1[0]).__name__ == 'FusedBasicBlock'\n"
            "assert torch.allclose(model(saved['x']), saved['y'], rtol=1e-5, atol=1e-5)\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    assert pickle.loads(pickle.dumps(fused)).layer1[0].bn2.fused_pattern == "batch_norm_add_relu"


def test_wrapped_models_are_refused_clearly():
    with pytest.raises(TypeError, match="convert the model first, then wrap it"):
        fusedres.convert(nn.DataParallel(torchvision.models.resnet18()))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fusedres.convert("resnet18")


def test_batch_norm_replacing_tools_never_drop_the_relu():
    """convert_sync_batchnorm and timm's freezer rebuild batch-norms as plain modules: the converted sites then run
    unfused, exactly, and say so."""
    timm_layers = pytest.importorskip("timm.layers")
    plain = randomize_batch_norms(torchvision.models.resnet18(num_classes=10)).to(torch.float64).eval()
    x = make_input((2, 3, 32, 32), torch.float64)
    expected = plain(x)
    for tool in (nn.SyncBatchNorm.convert_sync_batchnorm, timm_layers.freeze_batch_norm_2d):
        fused = fusedres.convert(plain)
        fusedres.modules._warned_once.clear()  # the warning is given once per replacing module type
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rebuilt = tool(fused).eval()
            assert_close(rebuilt(x), expected, f"output after {tool.__name__}", tolerance=MODEL_TOLERANCE)
        assert any("fused batch-norm was replaced" in str(w.message) for w in caught), "silently unfused"


def test_torch_compile_traces_a_converted_model_without_graph_breaks():
    torch._dynamo.reset()
    model = fusedres.convert(randomize_batch_norms(seed.SmallResNet())).to(torch.float64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    x = make_input((2, 3, 8, 8), torch.float64)
    assert_close(compiled(x), model(x), "compiled output")


def test_a_model_converted_and_saved_by_an_earlier_fusedres_still_loads_and_computes_the_same():
    """tests/data/converted_by_fde3887.pt: a Conv2dNormActivation (a swapped pair) and a torchvision BasicBlock (a
    rewritten forward) converted and saved by fusedres at fde3887, before the conversion runtime moved to
    fusedres.converted and the fused activation's attributes were renamed."""
    saved = torch.load(ROOT / "tests" / "data" / "converted_by_fde3887.pt", weights_only=False)
    model = saved["model"]
    assert fusedres.conversion_report(model)["batch_norm_add_relu"] == ["1.bn2"]
    assert_close(model(saved["x"]), saved["expected"], "the old pickle's output", tolerance=MODEL_TOLERANCE)
    assert_close(fusedres.revert(model)(saved["x"]), saved["expected"], "reverted", tolerance=MODEL_TOLERANCE)

"""The conversion contract (docs/design.md, "Conversion"): after ``convert`` the model computes what the original
would, whatever the user does to it later (a tool that rebuilds its batch-norms, hooks, a module or an attribute
changed, a residual that broadcasts, feature extraction by tracing, torch.func), or the site runs unfused, exactly,
or the change is refused loudly. Every check is against the original model under the same change, in fp64; the
fused path's own numerics (Mish's tail, channels far from 0, the interpreter's bf16 rounding) close the file."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
import fusedres.functional as FF
from fusedres.modules import ActivationFusedAway
from tests.helpers import DEVICE, FULL, MODEL_TOLERANCE, assert_close, make_input, randomize_batch_norms

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def _pair(model: nn.Module, training: bool = False) -> tuple[nn.Module, nn.Module]:
    """(eager, converted) fp64 copies sharing the initial state, in the mode asked."""
    eager = randomize_batch_norms(model).to(DEVICE, torch.float64).train(training)
    return eager, fusedres.convert(eager)


def _same(fused: nn.Module, eager: nn.Module, shape, what: str, *, seed: int = 0) -> None:
    """Outputs of the two models on one input (the same RNG state for each, for dropout), fp64."""
    x = make_input(shape, torch.float64)
    torch.manual_seed(seed)
    expected = eager(x)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unfused fallbacks say so once; what matters here is the result
        actual = fused(x)
    assert_close(actual, expected, what, tolerance=MODEL_TOLERANCE)


# --- 1. Tools that rebuild batch-norms keep the activation ------------------------------------------------------

class _TimmBlock(nn.Module):
    """timm's BatchNormAct2d with an activation, then one without, taking the add (as timm's blocks do)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn1 = timm.layers.BatchNormAct2d(6, act_layer=nn.Hardswish)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = timm.layers.BatchNormAct2d(6, apply_act=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + x)


@pytest.mark.parametrize("tool", ["freeze_batch_norm_2d", "convert_sync_batchnorm"])
@pytest.mark.parametrize("model", ["block", pytest.param("mobilenetv3_small_050", marks=FULL)])  # (--full: 3-7 s)
def test_timm_tools_on_a_converted_model_keep_every_activation(tool, model):
    """timm's freezer and its synchronized batch-norm converter rebuild a converted timm BatchNormAct2d as their
    own act-keeping class, as they would the original (they used to drop the activation)."""
    make = _TimmBlock if model == "block" else lambda: timm.create_model(model, num_classes=8)
    shape = (2, 6, 7, 7) if model == "block" else (2, 3, 32, 32)
    eager, fused = _pair(make())
    assert fusedres.conversion_report(fused)["batch_norm_act"], "nothing fused: the test would say nothing"
    apply = getattr(timm.layers, tool)
    _same(apply(fused).eval(), apply(eager).eval(), shape, f"timm's {tool} on a converted {model}")


def test_converted_timm_modules_pickle():
    eager, fused = _pair(_TimmBlock())
    again = pickle.loads(pickle.dumps(fused))
    assert type(again.bn1) is type(fused.bn1) and isinstance(again.bn1, timm.layers.BatchNormAct2d)
    _same(again, eager, (2, 6, 5, 5), "a converted timm block after pickling")


# --- 2. Hooks fire as they would on the original -----------------------------------------------------------------

def _recorder(calls: list):
    return lambda module, args, output: calls.append((args[0].detach().clone(), output.detach().clone()))


def _assert_same_calls(fused_calls: list, eager_calls: list, what: str) -> None:
    assert len(fused_calls) == len(eager_calls) > 0, f"{what}: {len(fused_calls)} calls, eager {len(eager_calls)}"
    for (args, out), (eager_args, eager_out) in zip(fused_calls, eager_calls):
        assert_close(args, eager_args, f"{what}: hook input", tolerance=MODEL_TOLERANCE)
        assert_close(out, eager_out, f"{what}: hook output", tolerance=MODEL_TOLERANCE)


def _quiet(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(x)


def test_hooks_on_activation_modules_fire_as_in_the_original():
    """resnet18's ReLU of layer1.0 runs twice per forward (after bn1 and after the add); a hook on it, registered
    after conversion or before (convert copies it), sees the same two calls with the same tensors as in the
    original, and the output is the original's."""
    eager, fused = _pair(torchvision.models.resnet18(num_classes=10))
    x = make_input((2, 3, 32, 32), torch.float64)
    fused_calls, eager_calls = [], []
    fused.layer1[0].relu.register_forward_hook(_recorder(fused_calls))
    handle = eager.layer1[0].relu.register_forward_hook(_recorder(eager_calls))
    assert_close(_quiet(fused, x), eager(x), "output, a hook registered after conversion",
                 tolerance=MODEL_TOLERANCE)
    _assert_same_calls(fused_calls, eager_calls, "registered after conversion")
    handle.remove()
    calls = []
    eager.layer1[0].relu.register_forward_hook(_recorder(calls))
    fused = fusedres.convert(eager)  # the hook is copied with the model
    expected = eager(x)
    assert_close(_quiet(fused, x), expected, "output, a hook registered before conversion", tolerance=MODEL_TOLERANCE)
    _assert_same_calls(calls[2:], calls[:2], "registered before conversion")


@FULL
def test_hooks_on_a_timm_models_activation_and_batch_norm_fire_as_in_the_original():
    """timm's resnet18 (act1 after bn1 in a block whose forward is rewritten): hooks on act1 and on bn1. (--full:
    a second whole model, 4-5 s; the quick tier hooks torchvision's resnet18.)"""
    eager, fused = _pair(timm.create_model("resnet18", num_classes=10))
    assert "layer1.0.bn1" in fusedres.conversion_report(fused)["batch_norm_relu"]
    x = make_input((2, 3, 32, 32), torch.float64)
    for target in ("act1", "bn1"):
        calls = {"eager": [], "fused": []}
        handles = [getattr(model.layer1[0], target).register_forward_hook(_recorder(calls[name]))
                   for name, model in (("fused", fused), ("eager", eager))]
        assert_close(_quiet(fused, x), eager(x), f"output, a hook on {target}", tolerance=MODEL_TOLERANCE)
        for handle in handles:
            handle.remove()
        _assert_same_calls(calls["fused"], calls["eager"], f"a hook on layer1.0.{target}")


def test_hooks_on_swapped_modules_and_batch_norms_see_what_the_original_computes():
    """A Conv2dNormActivation's batch-norm and Hardswish are fused by swapping modules; a hook on the Hardswish's
    stand-in, on the batch-norm, or a global one sees the original's inputs and outputs."""
    layer = lambda: nn.Sequential(torchvision.ops.Conv2dNormActivation(4, 6, activation_layer=nn.Hardswish))  # noqa
    eager, fused = _pair(layer())
    assert isinstance(fused[0][2], ActivationFusedAway)
    x = make_input((2, 4, 5, 5), torch.float64)
    for target in ("activation", "batch-norm", "global"):
        calls = {"eager": [], "fused": []}
        for name, model in (("fused", fused), ("eager", eager)):
            if target == "global":
                handle = torch.nn.modules.module.register_module_forward_hook(_recorder(calls[name]))
            else:
                handle = model[0][2 if target == "activation" else 1].register_forward_hook(_recorder(calls[name]))
            _quiet(model, x)
            handle.remove()
        _assert_same_calls(calls["fused"], calls["eager"], f"a hook on the {target}")
    assert fused[0][1].fuses_partner(), "without hooks, the pair runs fused again"


def test_hooks_and_changes_on_a_converted_timm_batch_norm_acts_own_act_are_seen():
    """A timm BatchNormAct2d fused in place, and one that took the add after it: its own act hooked, or replaced."""
    eager, fused = _pair(_TimmBlock())
    for name in ("bn1", "bn2"):
        calls = {"eager": [], "fused": []}
        handles = [getattr(model, name).act.register_forward_hook(_recorder(calls[key]))
                   for key, model in (("fused", fused), ("eager", eager))]
        assert_close(_quiet(fused, x := make_input((2, 6, 5, 5), torch.float64)), eager(x),
                     f"a hook on {name}.act", tolerance=MODEL_TOLERANCE)
        for handle in handles:
            handle.remove()
        _assert_same_calls(calls["fused"], calls["eager"], f"a hook on {name}.act")
    for model in (eager, fused):
        model.bn2.act = nn.Tanh()  # bn2 fused the add and the ReLU after it: its own act must now run first
    _same(fused, eager, (2, 6, 5, 5), "bn2.act replaced after conversion")


def _replica(module: nn.Module) -> nn.Module:
    """What nn.DataParallel's replicate makes of ``module`` for a device (without GPUs): each module a shallow
    copy (``_replicate_for_data_parallel``) holding its parameters as plain attributes, its children replaced by
    their replicas."""
    replicas = {m: m._replicate_for_data_parallel() for m in module.modules()}
    for m, replica in replicas.items():
        for name, parameter in m._parameters.items():
            setattr(replica, name, parameter)
        for name, child in m._modules.items():
            if child is not None:
                replica._modules[name] = replicas[child]
    return replicas[module]


def test_a_data_parallel_replica_computes_what_the_original_does():
    layer = lambda: nn.Sequential(torchvision.ops.Conv2dNormActivation(4, 6, activation_layer=nn.SiLU))  # noqa
    eager, fused = _pair(layer())
    _same(_replica(fused), eager, (2, 4, 5, 5), "a DataParallel replica of a swapped pair")


def test_activations_found_by_type_and_replaced_are_applied():
    """A loop replacing every nn.ReLU with nn.SiLU finds the fused-away ReLU modules' stand-ins too."""
    eager, fused = _pair(torchvision.models.resnet18(num_classes=10))
    for model in (eager, fused):
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(parent, name, nn.SiLU())
    _same(fused, eager, (2, 3, 32, 32), "resnet18 with every ReLU module replaced by SiLU")


def test_revert_gives_activation_modules_the_models_mode():
    fused = fusedres.convert(torchvision.models.resnet18(num_classes=10)).eval()
    assert not any(m.training for m in fusedres.revert(fused).modules())


class _ReadsADevice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.where = torch.device("cpu")
        self.sizes = [4, 4]

    def forward(self, x):
        return F.relu(self.bn(self.conv(x.to(self.where)))) * len(self.sizes)


def test_attributes_that_did_not_change_keep_the_block_fused():
    eager, fused = _pair(_ReadsADevice())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        _same(fused, eager, (2, 4, 5, 5), "a block reading a device and a list")


# --- 3. What the user changes in a module is applied -------------------------------------------------------------

@pytest.mark.parametrize("change", ["act = SiLU", "act.negative_slope = 0.5", "act = ELU (not fused)"])
def test_batch_norm_act2d_applies_the_act_it_holds_now(change):
    reference = timm.layers.BatchNormAct2d(5, act_layer=nn.LeakyReLU).double().eval()
    randomize_batch_norms(reference)
    module = fusedres.BatchNormAct2d(5, act_layer=nn.LeakyReLU).double().eval()
    module.load_state_dict(reference.state_dict())
    for m in (reference, module):
        if change == "act = SiLU":
            m.act = nn.SiLU()
        elif change == "act.negative_slope = 0.5":
            m.act.negative_slope = 0.5
        else:
            m.act = nn.ELU()
    x = make_input((3, 5, 4, 4), torch.float64)
    if change.endswith("(not fused)"):
        fusedres.modules._warned_once.clear()
        with pytest.warns(UserWarning, match="ELU is not one fusedres fuses"):
            actual = module(x)
    else:
        actual = module(x)
    assert_close(actual, reference(x), change)


class _Swapped(nn.Module):
    """conv, batch-norm and a LeakyReLU module used once: converted by swapping the two modules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@FULL
def test_a_timm_models_batch_norm_act_changed_after_conversion_is_applied():
    """timm's mobilenetv3: its BatchNormAct2d modules, fused in place, given another activation. (--full: a whole
    model, 4 s; the quick tier changes a single BatchNormAct2d's act.)"""
    eager, fused = _pair(timm.create_model("mobilenetv3_small_050", num_classes=8))
    for model in (eager, fused):
        model.bn1.act = nn.SiLU()
        model.blocks[1][0].bn1.act = nn.ELU()  # not one fusedres fuses
    _same(fused, eager, (2, 3, 32, 32), "mobilenetv3 with changed activations")


@pytest.mark.parametrize("change", ["negative_slope", "replaced by SiLU", "replaced by ELU"])
def test_activation_modules_changed_after_conversion_are_applied(change):
    """At a swapped site (the activation module's stand-in) and at a rewritten one (resnet's BasicBlock, whose
    ReLU module the rewritten forward looks up at call time)."""
    for make, shape in ((_Swapped, (2, 4, 5, 5)),
                        (lambda: torchvision.models.resnet.BasicBlock(4, 4), (2, 4, 5, 5))):
        eager, fused = _pair(make())
        name = "act" if isinstance(eager, _Swapped) else "relu"
        if change == "negative_slope":
            if name != "act":
                continue
            fused.act.negative_slope = eager.act.negative_slope = 0.3  # through the stand-in
        else:
            new = nn.SiLU if change.endswith("SiLU") else nn.ELU
            setattr(fused, name, new())
            setattr(eager, name, new())
        _same(fused, eager, shape, f"{type(eager).__name__}: {change}")


# --- 4. What the trace froze is re-checked at call time -----------------------------------------------------------

class _HelperReadsTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def _drop(self, x):
        return F.dropout(x, 0.5, self.training)

    def forward(self, x):
        return self._drop(F.relu(self.bn(self.conv(x))))


class _Switches(nn.Module):
    """A slope, a flag and an optional projection, read by the forward: the trace freezes each."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.slope = 0.1
        self.use_res = True
        self.project = None

    def forward(self, x):
        out = F.leaky_relu(self.bn1(self.conv(x)), self.slope)
        out = self.bn2(self.conv(out))
        if self.use_res:
            out = out + (x if self.project is None else self.project(x))
        return F.relu(out)


def test_a_training_flag_read_in_a_method_is_not_frozen():
    eager, fused = _pair(_HelperReadsTraining(), training=True)
    report = fusedres.conversion_report(fused)
    assert any("self.training" in line for line in report["not_analysed"]), report
    for training in (True, False):
        _same(fused.train(training), eager.train(training), (2, 4, 5, 5), f"training={training}")


@pytest.mark.parametrize("change", ["slope", "use_res", "project"])
def test_attributes_the_trace_read_are_rechecked_at_call_time(change):
    eager, fused = _pair(_Switches())
    report = fusedres.conversion_report(fused)
    assert report["batch_norm_act"] == ["bn1"] and report["batch_norm_add_relu"] == ["bn2"], report
    _same(fused, eager, (2, 4, 5, 5), "before the change (fused)")
    for model in (eager, fused):
        if change == "slope":
            model.slope = 0.35
        elif change == "use_res":
            model.use_res = False
        else:
            model.project = nn.Conv2d(4, 4, 1).double()
    fused.project = copy.deepcopy(eager.project)
    fusedres.modules._warned_once.clear()
    with pytest.warns(UserWarning, match=f"{change} differs from its value at conversion"):
        fused(make_input((2, 4, 5, 5), torch.float64))
    _same(fused, eager, (2, 4, 5, 5), f"after changing {change}")
    for training in (True, False):  # the fallback computes the batch-norms alone, running statistics included
        _same(fused.train(training), eager.train(training), (2, 4, 5, 5), f"training={training}")
    assert_close(fused.bn1.running_mean, eager.bn1.running_mean, "running_mean", tolerance=MODEL_TOLERANCE)


def test_a_projection_added_to_a_converted_torchvision_block_is_used():
    """torchvision's BasicBlock read ``self.downsample`` (None) while traced; one set later takes effect."""
    eager, fused = _pair(torchvision.models.resnet.BasicBlock(4, 4))
    for model in (eager, fused):
        model.downsample = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)).double().eval()
    fused.downsample.load_state_dict(eager.downsample.state_dict())
    _same(fused, eager, (2, 4, 5, 5), "BasicBlock with a downsample set after conversion")


# --- 5. An add that broadcasts is not a residual ------------------------------------------------------------------

class _BroadcastAdd(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.position = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.register_buffer("scalar", torch.tensor(0.25))

    def forward(self, x):
        y = self.bn(self.conv(x))
        other = {"positional bias": self.position, "pooled": F.adaptive_avg_pool2d(x, 1), "0-dim buffer":
                 self.scalar}[self.kind]
        return F.relu(y + other)


@pytest.mark.parametrize("kind", ["positional bias", "pooled", "0-dim buffer"])
def test_a_broadcasting_add_runs_as_in_the_original(kind):
    for training in (False, True):
        eager, fused = _pair(_BroadcastAdd(kind), training=training)
        _same(fused, eager, (2, 4, 5, 5), f"{kind}, training={training}")


# --- 6. Feature extraction by tracing -----------------------------------------------------------------------------

def test_create_feature_extractor_and_symbolic_trace_on_a_converted_resnet18():
    """A converted model traces as its original: the same node names, each computing what it computes there (a
    batch-norm node is the batch-norm alone), unfused; a feature extractor of the original converts and fuses."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    eager, fused = _pair(torchvision.models.resnet18(num_classes=10))
    # the same names (a fused site's batch-norm node may come later, after the shortcut's nodes)
    assert [sorted(names) for names in get_graph_node_names(fused)] == [sorted(names) for names in
                                                                       get_graph_node_names(eager)]
    nodes = {"layer1": "c2", "layer1.0.bn1": "bn", "layer1.0.relu": "relu", "layer1.0.bn2": "bn2",
             "layer1.0.add": "add", "layer1.0.relu_1": "out", "relu": "stem", "layer4": "c5", "fc": "logits"}
    x = make_input((2, 3, 32, 32), torch.float64)
    expected = create_feature_extractor(eager, nodes)(x)
    features = create_feature_extractor(fused, nodes)(x)
    assert features.keys() == expected.keys()
    for name in expected:
        assert_close(features[name], expected[name], f"feature {name}", tolerance=MODEL_TOLERANCE)
    traced = torch.fx.symbolic_trace(fused)
    assert_close(traced(x), eager(x), "symbolic_trace", tolerance=MODEL_TOLERANCE)
    extractor = fusedres.convert(create_feature_extractor(eager, nodes))
    report = fusedres.conversion_report(extractor)
    # every site but the two whose batch-norm output is itself a requested feature
    assert len(report["batch_norm_relu"]) == 8 and len(report["batch_norm_add_relu"]) == 7, report
    assert "layer1.0.bn1" not in report["batch_norm_relu"] and "layer1.0.bn2" not in report["batch_norm_add_relu"]
    fused_features = extractor(x)
    for name in expected:
        assert_close(fused_features[name], expected[name], f"converted extractor: {name}", tolerance=MODEL_TOLERANCE)


def test_a_converted_model_whose_own_forward_was_rewritten_traces():
    eager, fused = _pair(_Switches())
    x = make_input((2, 4, 5, 5), torch.float64)
    traced = torch.fx.symbolic_trace(fused)
    assert_close(traced(x), eager(x), "symbolic_trace of a rewritten root", tolerance=MODEL_TOLERANCE)


# --- 7. What fusedres cannot run is refused loudly; what torch.func does runs --------------------------------------

def test_torch_jit_script_is_refused_with_what_to_do():
    fused = fusedres.convert(torchvision.models.resnet18(num_classes=10))
    with pytest.raises(TypeError, match="fusedres.revert"):
        torch.jit.script(fused)


def test_torch_func_transforms_match_eager():
    """grad, vmap(grad) and jacrev through the fused functions (eager PyTorch computes them under torch.func)."""
    x = make_input((2, 3, 4, 4), torch.float64)
    r = make_input((2, 3, 4, 4), torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    fused = lambda t: FF.batch_norm_act(t, None, None, w, None, True, residual=r, activation="silu").sum()  # noqa
    eager = lambda t: F.silu(F.batch_norm(t, None, None, w, None, True) + r).sum()  # noqa
    assert_close(torch.func.grad(fused)(x), torch.func.grad(eager)(x), "grad")
    per_sample = lambda f: torch.func.vmap(torch.func.grad(lambda t: f(t[None])))  # noqa: E731
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    fused_eval = lambda t: FF.batch_norm_relu(t, rm, rv, w, None).sum()  # noqa: E731
    eager_eval = lambda t: F.relu(F.batch_norm(t, rm, rv, w, None)).sum()  # noqa: E731
    assert_close(per_sample(fused_eval)(x), per_sample(eager_eval)(x), "vmap(grad)")
    assert_close(torch.func.jacrev(lambda t: FF.add_relu(t, r))(x), torch.func.jacrev(lambda t: F.relu(t + r))(x),
                 "jacrev")


# --- 8. Smaller items ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gelu_tanh", "swish", "hard_swish", "gelu", "mish", "leaky_relu", "relu6"])
@pytest.mark.parametrize("act_kwargs", [None, {"inplace": False}])
def test_activation_names_build_timms_modules(name, act_kwargs):
    kwargs = dict(act_layer=name, act_kwargs=dict(act_kwargs) if act_kwargs else None)
    assert repr(fusedres.BatchNormAct2d(4, **kwargs).act) == repr(timm.layers.BatchNormAct2d(4, **kwargs).act)


def test_revert_after_convert_sync_batchnorm_gives_sync_batch_norms():
    model = fusedres.convert(torchvision.models.resnet18(num_classes=10))
    reverted = fusedres.revert(fusedres.convert_sync_batchnorm(model))
    kinds = {type(m) for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.SyncBatchNorm}


def test_mish_far_negative_tail_is_accurate():
    """log(1 + exp(z)) lost the tail (0 where exp(z) < 2**-24); the log1p form keeps it, as eager's does."""
    z = torch.linspace(-80.0, 20.0, 2001).reshape(1, -1, 1, 1)
    y = FF.add_act(z, torch.zeros_like(z), activation="mish").double()
    expected = F.mish(z.double())
    relative = ((y - expected).abs() / expected.abs().clamp_min(1e-300)).max()
    assert relative <= 1e-4, f"relative error {float(relative):.2e}"


@pytest.mark.parametrize("channels_last", [False, True])
def test_statistics_of_a_channel_far_from_zero_are_as_accurate_as_eagers(channels_last):
    x = 12345.678 + 0.01 * torch.randn(8, 4, 9, 9)
    x[:, 1] = 12345.678  # exactly constant
    x = x.to(DEVICE).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x64 = x.double()
    errors = {}
    for name, call in (("fused", lambda *a: FF.batch_norm_act(*a, activation="identity")), ("eager", F.batch_norm)):
        rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
        y = call(x, rm, rv, None, None, True)
        rm64, rv64 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        y64 = F.batch_norm(x64, rm64, rv64, None, None, True)
        errors[name] = [float((a.double() - b).abs().max()) for a, b in ((y, y64), (rm, rm64), (rv, rv64))]
    for what, fused, eager in zip(("output", "running_mean", "running_var"), errors["fused"], errors["eager"]):
        assert fused <= max(eager, 1e-6), f"{what}: fused error {fused:.3g}, eager's {eager:.3g}"


class _CachesOnFirstCall(nn.Module):
    """Computes something on its first call and keeps it, as torchvision's MultiScaleRoIAlign keeps its scales."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.channels = None

    def forward(self, x):
        if self.channels is None:
            self.channels = x.shape[1]
        return torch.relu(self.bn(x)) * self.channels


def test_conversion_leaves_no_trace_state_in_modules_that_cache_on_their_first_call():
    """convert traces forwards: what a forward sets on its module while traced (values made of Proxies) is undone,
    so the first real call computes it as in the original; and a forward that sets attributes is not replaced by
    its trace (which would not set them): its site is named, unfused."""
    eager = randomize_batch_norms(_CachesOnFirstCall()).double().to(DEVICE).eval()
    fused = fusedres.convert(eager)
    assert fused.channels is None
    report = fusedres.conversion_report(fused)
    assert report["batch_norm_relu"] == [] and any("sets self.channels" in text for text in report["not_analysed"])
    x = make_input((2, 3, 4, 4), torch.float64)
    for _ in range(2):
        assert_close(fused(x), eager(x), "a module that caches on its first call", tolerance=MODEL_TOLERANCE)
    assert fused.channels == eager.channels == 3


class _RecordsInPlace(nn.Module):
    """Keeps what it sees in containers it changes in place."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.seen, self.last = [], {}

    def forward(self, x):
        self.seen.append(x.shape[0])
        self.last["batch"] = x.shape[0]
        return torch.relu(self.bn(x))


def test_conversion_restores_containers_a_traced_forward_changed_in_place():
    eager = randomize_batch_norms(_RecordsInPlace()).double().to(DEVICE).eval()
    fused = fusedres.convert(eager)
    assert fused.seen == [] and fused.last == {}
    report = fusedres.conversion_report(fused)
    assert report["batch_norm_relu"] == [] and any("sets self.seen" in text for text in report["not_analysed"])
    x = make_input((2, 3, 4, 4), torch.float64)
    assert_close(fused(x), eager(x), "a module that records in place", tolerance=MODEL_TOLERANCE)
    assert fused.seen == eager.seen == [2] and fused.last == eager.last == {"batch": 2}

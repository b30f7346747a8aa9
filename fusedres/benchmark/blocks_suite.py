"""The blocks and models suites: whole modules, eager against torch.compile against ``fusedres.convert``, all
three from the same initial weights. Half dtypes run under autocast (fp32 parameters), as users train."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn.functional as F

from .cases import no_grad_call
from .memory_use import retained_bytes
from .runner import (INTERPRETER_NOTE, SAVE_MEMORY, Settings, dtype_name, fresh_compile, max_error, measure_cpu,
                     measure_gpu, rows_of_cases)


def _seed(name, *args):
    from fusedres import seed

    return lambda: getattr(seed, name)(*args)


def _torchvision(name, *args):
    """A torchvision block (torchvision.models.resnet's) or model (torchvision.models')."""
    def make():
        import torchvision.models
        from torchvision.models import resnet

        return getattr(resnet, name, None)(*args) if hasattr(resnet, name) else getattr(torchvision.models, name)()
    return make


# (name, constructor, channels in, spatial size) at GPU scale; the CPU run shrinks them.
BLOCKS = [
    ("seed.BasicBlock", lambda c: _seed("BasicBlock", c)(), 64, 56),
    ("seed.ProjectionBlock", lambda c: _seed("ProjectionBlock", c, 2 * c, 2)(), 64, 56),
    ("seed.BottleneckBlock", lambda c: _seed("BottleneckBlock", c, c // 4, c)(), 256, 56),
    ("seed.PreActBlock", lambda c: _seed("PreActBlock", c)(), 64, 56),
    ("torchvision.BasicBlock", lambda c: _torchvision("BasicBlock", c, c)(), 64, 56),
    ("torchvision.Bottleneck", lambda c: _torchvision("Bottleneck", c, c // 4)(), 256, 56),
]
QUICK_BLOCKS = ("seed.BasicBlock", "torchvision.Bottleneck")
# torchvision's models: the ResNets, and the CNNs with other activations (ReLU6 and the linear bottleneck; SiLU).
MODELS = [("resnet18", _torchvision("resnet18")), ("resnet50", _torchvision("resnet50")),
          ("mobilenet_v2", _torchvision("mobilenet_v2")), ("efficientnet_b0", _torchvision("efficientnet_b0"))]
GPU_IMAGE_SIZE, CPU_IMAGE_SIZE = 224, 32


def _autocast(settings: Settings, dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(settings.device.type, dtype=dtype)
    return contextlib.nullcontext()


def _providers(module: torch.nn.Module, settings: Settings, with_save_memory: bool = False):
    """(provider, module) pairs sharing the initial weights (``SAVE_MEMORY``, the models suite's, when asked)."""
    import fusedres

    for provider in settings.providers:
        if provider == "eager":
            yield provider, copy.deepcopy(module)
        elif provider == "compile":
            yield provider, fresh_compile(copy.deepcopy(module))
        elif provider == "fusedres":
            yield provider, fusedres.convert(module)
        elif provider == SAVE_MEMORY and with_save_memory:
            yield provider, fusedres.convert(module, save_memory=True)


def _prepare(module, settings: Settings, layout: str, training: bool, dtype=torch.float32):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return module.to(settings.device, dtype, memory_format=fmt).train(training)


def _input(shape, settings, layout, requires_grad, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, generator=generator).to(settings.device, dtype, memory_format=fmt)
    return x.requires_grad_(requires_grad)


def _block_step(module, x, mode, autocast):
    if mode == "inference":
        return no_grad_call(module, x, autocast=autocast)

    def run():
        with autocast:
            y = module(x)
        grads = torch.autograd.grad(y.float().square().mean(), [x, *module.parameters()])
        return (y, *grads)
    return run


def _available(block) -> bool:
    try:
        block[1](8)
        return True
    except ImportError as missing:
        print(f"fusedres-bench: skipping {block[0]}: {missing}")
        return False


def run_blocks(settings: Settings) -> Iterator[dict]:
    """The rows of each case as soon as it is measured."""
    blocks = [b for b in BLOCKS if (not settings.quick or b[0] in QUICK_BLOCKS) and _available(b)]
    modes = ("inference", "forward_backward")
    cases = [(b, dtype, layout, mode) for b in blocks for dtype in settings.dtypes for layout in settings.layouts
             for mode in modes]

    def rows_of(case):
        (name, make, channels, size), dtype, layout, mode = case
        if not settings.on_gpu:
            channels, size = max(4, channels // 16), 8
        shape = (settings.batch_size, channels, size, size)
        base = dict(level="block", op=name, mode=mode, shape="x".join(map(str, shape)), dtype=dtype_name(dtype),
                    layout=layout)
        return base, lambda: _block_rows(base, lambda: make(channels), shape, mode, dtype, layout, settings)

    yield from rows_of_cases(cases, "blocks", rows_of)


def _block_rows(base, make, shape, mode, dtype, layout, settings) -> list[dict]:
    torch.manual_seed(0)
    module = make()
    if not settings.on_gpu:
        return _cpu_rows(base, module, shape, mode, dtype, layout, settings)
    training = mode != "inference"
    rows = []
    for provider, candidate in _providers(module, settings):
        candidate = _prepare(candidate, settings, layout, training)
        make_step = lambda seed, c=candidate: _block_step(  # noqa: E731
            c, _input(shape, settings, layout, training, seed=seed), mode, _autocast(settings, dtype))
        rows.append(measure_gpu(dict(base, provider=provider), make_step, settings, compiled=provider == "compile",
                                input_bytes=4 * torch.Size(shape).numel()))
    return rows


def _cpu_rows(base, module, shape, mode, dtype, layout, settings) -> list[dict]:
    training = mode != "inference"
    reference_module = _prepare(copy.deepcopy(module), settings, layout, training, torch.float64)
    reference = _block_step(reference_module, _input(shape, settings, layout, training, torch.float64), mode,
                            contextlib.nullcontext())()
    rows = []
    for provider, candidate in _providers(module, settings):
        candidate = _prepare(candidate, settings, layout, training)
        step = _block_step(candidate, _input(shape, settings, layout, training), mode, _autocast(settings, dtype))
        row = dict(base, provider=provider, max_abs_error=max_error(step(), reference))
        if provider == "fusedres":
            rows.append(dict(row, timer="interpreter (not timed)", note=INTERPRETER_NOTE))
        else:
            rows.append(measure_cpu(row, step, settings))
    return rows


def _model_step(model, x, labels, mode, autocast, optimizer):
    if mode == "inference":
        return no_grad_call(model, x, autocast=autocast)

    def run():
        with autocast:
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return run


def run_models(settings: Settings) -> Iterator[dict]:
    """The rows of each case as soon as it is measured."""
    models = MODELS[:1] if settings.quick and not settings.on_gpu else MODELS
    modes = ("inference", "train_step")
    cases = [(m, dtype, layout, mode) for m in models for dtype in settings.dtypes for layout in settings.layouts
             for mode in modes]
    size = GPU_IMAGE_SIZE if settings.on_gpu else CPU_IMAGE_SIZE
    shape = (settings.batch_size, 3, size, size)

    def rows_of(case):
        (name, make), dtype, layout, mode = case
        base = dict(level="model", op=f"torchvision.{name}", mode=mode, shape="x".join(map(str, shape)),
                    dtype=dtype_name(dtype), layout=layout)
        return base, lambda: _model_rows(base, make, shape, mode, dtype, layout, settings)

    yield from rows_of_cases(cases, "models", rows_of)


def _model_rows(base, make, shape, mode, dtype, layout, settings) -> list[dict]:
    torch.manual_seed(0)
    model = make()
    training = mode == "train_step"
    labels = torch.randint(0, 1000, (shape[0],), generator=torch.Generator().manual_seed(0)).to(settings.device)
    rows = []
    for provider, candidate in _providers(model, settings, with_save_memory=True):
        candidate = _prepare(candidate, settings, layout, training)
        optimizer = torch.optim.SGD(candidate.parameters(), lr=1e-4)
        x = _input(shape, settings, layout, False)
        step = _model_step(candidate, x, labels, mode, _autocast(settings, dtype), optimizer)
        row = dict(base, provider=provider)
        if training and provider != "compile":  # what a training forward keeps for its backward, measured
            with _autocast(settings, dtype):
                row["retained_mb"] = retained_bytes(candidate, x) / 2**20
            candidate.zero_grad(set_to_none=True)
        if settings.on_gpu:
            row = measure_gpu(row, lambda seed, s=step: s, settings, compiled=provider == "compile",
                              input_bytes=None)
            if row.get("ms"):
                row["images_per_s"] = shape[0] / (row["ms"] * 1e-3)
        elif provider in ("fusedres", SAVE_MEMORY):
            row.update(timer="interpreter (not timed)", note=INTERPRETER_NOTE)
        else:
            row = measure_cpu(row, step, settings)
            row["images_per_s"] = shape[0] / (row["ms"] * 1e-3)
        rows.append(row)
    if not settings.on_gpu:
        _model_errors(rows, model, shape, labels, mode, layout, dtype, settings)
    return rows


def _model_errors(rows, model, shape, labels, mode, layout, dtype, settings) -> None:
    """CPU run: each provider's output (inference) or first loss (training step) against eager in float64."""
    import fusedres

    training = mode == "train_step"

    def first_result(candidate, run_dtype, autocast):
        candidate = _prepare(candidate, settings, layout, training, run_dtype)
        optimizer = torch.optim.SGD(candidate.parameters(), lr=0.0)
        return _model_step(candidate, _input(shape, settings, layout, False, run_dtype), labels, mode, autocast,
                           optimizer)()

    expected = first_result(copy.deepcopy(model), torch.float64, contextlib.nullcontext())
    candidates = {"eager": copy.deepcopy(model), "fusedres": fusedres.convert(model),
                  SAVE_MEMORY: fusedres.convert(model, save_memory=True)}
    for row in rows:
        if row["provider"] in candidates:
            row["max_abs_error"] = max_error(first_result(candidates[row["provider"]], torch.float32,
                                                          _autocast(settings, dtype)), expected)

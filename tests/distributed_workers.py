"""Multi-process checks of synchronized batch-norm, shared by the CPU suite (gloo, kernels in Triton's interpreter)
and tests/test_gpu.py (NCCL, one process per GPU): ``run_ranks`` spawns the ranks, the workers compare what each
rank computes with single-process fp64 eager PyTorch on the concatenated batch."""
from __future__ import annotations

import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fusedres
from fusedres import ops
from tests.helpers import MODEL_TOLERANCE, REFERENCE_ACTIVATIONS, assert_close, randomize_batch_norms

TIMEOUT_S = 240


def run_ranks(worker, world: int, backend: str, *args) -> None:
    """Run ``worker(rank, world, device, *args)`` in ``world`` spawned processes joined in a ``backend`` process
    group (NCCL: rank r on GPU r); fail with a rank's traceback, or after TIMEOUT_S. The rendezvous is a TCPStore
    this process serves on the loopback address, on a free port it binds itself (no pick-then-bind race)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    context = torch.multiprocessing.start_processes(_bootstrap, args=(world, store.port, backend, worker, args),
                                                    nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    while not context.join(timeout=2):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} on {world} ranks: no result after {TIMEOUT_S} s")


def _bootstrap(rank: int, world: int, port: int, backend: str, worker, args) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    try:
        worker(rank, world, device, *args)
    except Exception:
        raise RuntimeError(f"rank {rank}: {traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()


def _shard(batch: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return batch[start:start + sizes[rank]]


def module_worker(rank: int, world: int, device: torch.device, sizes: list[int], dtype: torch.dtype, activation: str,
                  residual: bool, momentum, use_kernels: bool) -> None:
    """Two training steps of a SyncBatchNormAct2d, each rank holding ``sizes[rank]`` samples of one batch: outputs,
    gradients (input, residual, and weight/bias summed over ranks) and running statistics against nn.BatchNorm2d
    in fp64 on the whole batch."""
    generator = torch.Generator().manual_seed(0)
    channels = 5
    full = (torch.randn(sum(sizes), channels, 4, 3, generator=generator) * 2 + 0.5).to(dtype)
    full_r = torch.randn(full.shape, generator=generator).to(dtype) if residual else None
    grad = torch.randn(full.shape, generator=generator).to(dtype)
    module = fusedres.SyncBatchNormAct2d(channels, momentum=momentum, act_layer=activation, dtype=dtype)
    randomize_batch_norms(module, torch.Generator().manual_seed(1))
    module.to(device).train()
    reference = nn.BatchNorm2d(channels, momentum=momentum, dtype=torch.float64)
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in module.state_dict().items()})
    reference.train()
    for step in range(2):  # twice: the running statistics move from where the first step left them
        x = _shard(full, sizes, rank).to(device).requires_grad_()
        r = _shard(full_r, sizes, rank).to(device).requires_grad_() if residual else None
        g = _shard(grad, sizes, rank).to(device)
        with fusedres.disabled(not use_kernels):
            assert ops.uses_kernels(x) == use_kernels, "the path under test is not the one asked for"
            y = module(x, r)
            leaves = [x, module.weight, module.bias] + ([r] if residual else [])
            grads = torch.autograd.grad(y, leaves, g)
        x64 = full.double().requires_grad_()
        r64 = full_r.double().requires_grad_() if residual else None
        z64 = reference(x64)
        y64 = REFERENCE_ACTIVATIONS[activation](z64 if r64 is None else z64 + r64, 0.01)
        what = f"rank {rank} step {step}"
        assert_close(y, _shard(y64, sizes, rank), f"{what}: output")
        leaves64 = [x64, reference.weight, reference.bias] + ([r64] if residual else [])
        ref_grads = torch.autograd.grad(y64, leaves64, grad.double())
        assert_close(grads[0], _shard(ref_grads[0], sizes, rank), f"{what}: grad of input")
        for name, local, expected in zip(("weight", "bias"), grads[1:3], ref_grads[1:3]):
            total = local.clone()
            dist.all_reduce(total)  # each rank's own sums, as nn.SyncBatchNorm's (DDP then reduces them)
            assert_close(total, expected, f"{what}: grad of {name} summed over ranks", dtype=dtype)
        if residual:
            assert_close(grads[3], _shard(ref_grads[3], sizes, rank), f"{what}: grad of residual")
        for name in ("running_mean", "running_var"):
            assert_close(getattr(module, name), getattr(reference, name), f"{what}: {name}")
        assert int(module.num_batches_tracked) == int(reference.num_batches_tracked)
    # Every rank empty: the running statistics stay where they are, as eager leaves them on an empty batch.
    running = [module.running_mean.clone(), module.running_var.clone()]
    with fusedres.disabled(not use_kernels):
        y = module(full[:0].to(device), full_r[:0].to(device) if residual else None)
    assert y.shape == (0,) + full.shape[1:]
    assert torch.equal(module.running_mean, running[0]) and torch.equal(module.running_var, running[1])


def ddp_worker(rank: int, world: int, device: torch.device, synchronized: bool, save_memory: bool = False) -> None:
    """One DistributedDataParallel training step of a converted torchvision resnet18 (fp64, each rank half of a
    batch of 4). ``synchronized``: after fusedres.convert_sync_batchnorm, against single-process eager on the whole
    batch; otherwise against the eager model under DDP on the same shards (per-rank statistics)."""
    import torchvision
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)  # the same model on every rank
    eager = randomize_batch_norms(torchvision.models.resnet18(num_classes=10).double(),
                                  torch.Generator().manual_seed(0))
    reference = torchvision.models.resnet18(num_classes=10).double()
    reference.load_state_dict(eager.state_dict())
    fused = fusedres.convert(eager, save_memory=save_memory)  # (save_memory: the outputs recomputed, bitwise)
    if synchronized:
        fusedres.convert_sync_batchnorm(fused)
        assert all(type(m) is fusedres.SyncBatchNormAct2d for m in fused.modules() if isinstance(m, nn.BatchNorm2d))
    device_ids = [device.index] if device.type == "cuda" else None
    model = DistributedDataParallel(fused.to(device), device_ids=device_ids)
    generator = torch.Generator().manual_seed(2)
    full = torch.randn(2 * world, 3, 32, 32, generator=generator, dtype=torch.float64)
    target = torch.randn(2 * world, 10, generator=generator, dtype=torch.float64)
    shard = slice(2 * rank, 2 * rank + 2)
    recomputed = []
    if save_memory:  # the synchronized sites' outputs are recomputed in the backward
        from fusedres.memory import Recompute

        original = Recompute.recompute
        Recompute.recompute = lambda self, version: recomputed.append(1) or original(self, version)
    (model(full[shard].to(device)) * target[shard].to(device)).sum().backward()
    assert bool(recomputed) == save_memory, f"rank {rank}: {len(recomputed)} outputs recomputed"
    if synchronized:
        (reference(full) * target).sum().backward()  # a sum over the batch: the ranks' gradients add up to it
        scale = world  # DDP averages the ranks' gradients
    else:
        reference_ddp = DistributedDataParallel(reference.to(device), device_ids=device_ids)
        (reference_ddp(full[shard].to(device)) * target[shard].to(device)).sum().backward()
        scale = 1
    for (name, param), expected in zip(fused.named_parameters(), reference.parameters()):
        assert_close(param.grad * scale, expected.grad, f"rank {rank}: grad of {name}", tolerance=MODEL_TOLERANCE)
    for (name, buffer), expected in zip(fused.named_buffers(), reference.buffers()):
        if buffer.is_floating_point():
            assert_close(buffer, expected, f"rank {rank}: {name}", tolerance=MODEL_TOLERANCE)

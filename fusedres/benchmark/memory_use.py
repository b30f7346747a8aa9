"""What a training forward keeps for the backward, measured from the allocator, never estimated: on a CPU from
torch.profiler's memory events, on a GPU from the caching allocator's counters (docs/design.md, "Memory
saving")."""
from __future__ import annotations

import gc
from typing import Callable

import torch


def retained_bytes(model: torch.nn.Module, x: torch.Tensor, forward: Callable | None = None) -> int:
    """Bytes allocated during one training forward of ``model`` on ``x`` and still held when it returns (the
    activations autograd keeps, and the output): parameters and what existed before are not counted. On a CPU from
    torch.profiler's memory events (allocations minus frees within the forward), on a GPU from
    ``torch.cuda.memory_allocated``."""
    run = forward or (lambda: model(x))
    model.train()
    # Triton's interpreter holds its kernels' arguments in reference cycles until the cycle collector runs: collect
    # before and after the forward, so that only what the forward keeps is counted
    gc.collect()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        output = run()
        gc.collect()
        torch.cuda.synchronize(x.device)
        retained = torch.cuda.memory_allocated(x.device) - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            output = run()
            gc.collect()
        retained = sum(event.self_cpu_memory_usage for event in prof.key_averages())
    del output
    return int(retained)

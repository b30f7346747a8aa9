"""What the GPU compiler makes of recorded kernel launches, without a GPU: registers, local memory, shared
memory, the width of every global load and store in the SASS, and the theoretical occupancy.

Why: whether a kernel gets 128-bit accesses or scalar ones, and whether it spills, decides its bandwidth, and
both depend on how Triton's JIT specialises a launch (integers equal to 1 become constants, integers and
pointers divisible by 16 get divisibility hints). Compiling without those hints, as a plain ``ASTSource`` does,
shows a different kernel from the one a GPU runs. Here a launch recorded by ``recorded_launches()`` is
specialised by the JIT's own code, compiled for an NVIDIA target, and its cubin is read with the ``cuobjdump``
that Triton ships.

    from fusedres.kernels import recorded_launches
    from fusedres.report.compiled import analyse, compile_for, specialise

    with recorded_launches() as launches:
        bn_act_apply(...)                      # on meta tensors
    kernel, args, num_warps = launches[0]
    report = analyse(compile_for(specialise(kernel, args, num_warps)))

``analyse_all`` does the same for many specialisations, compiling each distinct one once, in a pool of
processes. Runs only where Triton compiles (TRITON_INTERPRET unset); the functions raise otherwise.

``fusedres/report/kernel_report.py`` records what each op launches and runs this on it.
"""
from __future__ import annotations

import importlib
import re
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, CompiledKernel, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

KIB = 1024


# --- Specialisation: what the JIT would compile for a launch ------------------------------------------------


def _require_compiler(function: str) -> None:
    """Under the interpreter the kernels are not compiled (and ``@triton.jit`` makes interpreted functions)."""
    if knobs.runtime.interpret:
        raise RuntimeError(f"{function}: needs Triton's GPU compiler, but TRITON_INTERPRET is set in this process; "
                           f"run it in a process without TRITON_INTERPRET")


@dataclass(frozen=True)
class _PointerStandIn:
    """A tensor argument as the JIT's specialisation reads it: a dtype and an address. Meta tensors have no
    storage, so the address is chosen here (the divisibility hint depends only on ``address % 16``)."""

    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


def _stand_in(tensor: torch.Tensor, aligned: bool) -> _PointerStandIn:
    """Aligned: the storage starts on a 16-byte boundary (the caching allocator's blocks are 512-byte aligned), so
    a view is aligned as its byte offset is. Not aligned: an address that is a multiple of the element size only."""
    address = tensor.storage_offset() * tensor.element_size() if aligned else tensor.element_size()
    return _PointerStandIn(tensor.dtype, address)


@dataclass(frozen=True, eq=False)
class Specialisation:
    """One launch as Triton's JIT would compile it: the arguments of ``ASTSource`` and the options the JIT
    passes to ``triton.compile``. Equal specialisations compile to the same kernel: compare them by ``key``.

    Pickles by the kernel's module and name (a ``JITFunction`` does not pickle), so it can go to worker
    processes; the kernel must be a module-level attribute."""

    kernel: JITFunction
    signature: dict[str, Any]  # parameter name -> "*bf16", "i32", "fp32", "u1", "constexpr", ... (tuples: a tuple)
    constexprs: dict[tuple[int, ...], Any]  # (argument index,) -> value
    attrs: dict[tuple[int, ...], list]  # (argument index,) -> [["tt.divisibility", 16]] or []
    options: dict[str, Any]  # num_warps, and the debug and instrumentation options the JIT adds

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def num_warps(self) -> int:
        return self.options["num_warps"]

    @property
    def constexpr_values(self) -> dict[str, Any]:
        """The constants by parameter name (for reports; ``constexprs`` is keyed as ``ASTSource`` wants); an element
        of a tuple argument is named ``<parameter>.<index>``."""
        return {self._path_name(path): value for path, value in self.constexprs.items()}

    @property
    def flat_signature(self) -> dict[str, str]:
        """The signature with tuple arguments flattened: ``<parameter>.<index>`` -> type."""
        flat = {}

        def visit(name, kind):
            if isinstance(kind, tuple):
                for index, element in enumerate(kind):
                    visit(f"{name}.{index}", element)
            else:
                flat[name] = kind
        for name, kind in self.signature.items():
            visit(name, kind)
        return flat

    def _path_name(self, path: tuple[int, ...]) -> str:
        return ".".join([self.kernel.arg_names[path[0]], *map(str, path[1:])])

    def source(self) -> ASTSource:
        return ASTSource(fn=self.kernel, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs)

    @cached_property
    def key(self) -> tuple:
        """Triton's own hash of the source (kernel code, signature, constants, hints) and the options."""
        return self.source().hash(), tuple(sorted(self.options.items()))

    def __reduce__(self):
        return _specialisation_by_name, (self.kernel.fn.__module__, self.kernel.fn.__qualname__, self.signature,
                                         self.constexprs, self.attrs, self.options)


def _specialisation_by_name(module: str, qualname: str, signature, constexprs, attrs, options) -> Specialisation:
    kernel = importlib.import_module(module)
    for part in qualname.split("."):
        kernel = getattr(kernel, part)
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"Specialisation: expected {module}.{qualname} to be a triton.JITFunction, got "
                        f"{type(kernel).__name__} (was TRITON_INTERPRET set in this process?)")
    return Specialisation(kernel, signature, constexprs, attrs, options)


def specialise(kernel: JITFunction, args: dict[str, Any], num_warps: int, *, aligned: bool = True) -> Specialisation:
    """The specialisation Triton's JIT makes for ``kernel[grid](**args, num_warps=num_warps)``.

    Runs the JIT's own argument binder and packing (``create_function_from_signature``, ``JITFunction._pack_args``),
    so the rules are Triton's: tensors -> ``*<dtype>``, ints equal to 1 -> constexpr 1, other ints -> i32/i64/u64
    with a divisibility-16 hint when divisible by 16 (0 included), bools -> u1, floats -> fp32, None -> constexpr,
    ``tl.constexpr`` parameters -> constexpr, ``do_not_specialize`` honoured. Tensor addresses are made up (see
    ``aligned``) since meta tensors have none.

    aligned: True: every tensor's storage starts on a 16-byte boundary, as the caching allocator gives, so a
    pointer gets the hint when its view's byte offset is a multiple of 16. False: no pointer gets the hint.
    """
    _require_compiler("specialise")
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"specialise: expected a triton.JITFunction, got {type(kernel).__name__} "
                        f"(was TRITON_INTERPRET set when the kernel's module was imported?)")
    unknown = sorted(set(args) - set(kernel.arg_names))
    missing = [p.name for p in kernel.params if p.name not in args and not p.has_default]
    if unknown or missing:
        raise TypeError(f"specialise: arguments of {kernel.fn.__name__} do not match its parameters: "
                        f"unknown {unknown}, missing {missing}")
    if not hasattr(kernel, "_pack_args"):
        raise RuntimeError(f"specialise: this Triton ({triton.__version__}) has no JITFunction._pack_args; the JIT's "
                           f"specialisation code this reuses is there in Triton 3.6 and 3.8")
    backend = make_backend(GPUTarget("cuda", 90, 32))  # the hints are the same for every NVIDIA target
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    stand_ins = {name: _stand_in(value, aligned) if isinstance(value, torch.Tensor) else value
                 for name, value in args.items()}
    bound_args, specialization, bound_options = bind(**stand_ins)
    # The options JITFunction.run adds before it specialises.
    jit_options = {"num_warps": num_warps, "debug": bool(kernel.debug or knobs.runtime.debug),
                   "instrumentation_mode": knobs.compilation.instrumentation_mode}
    _, signature, constexprs, attrs = kernel._pack_args(backend, jit_options, bound_args, specialization,
                                                        bound_options)
    return Specialisation(kernel, signature, constexprs, attrs, jit_options)


def compile_for(spec: Specialisation, capability: int = 90) -> CompiledKernel:
    """Compile ``spec`` for ``sm_<capability>`` as the JIT would on such a GPU (Triton's cache applies)."""
    _require_compiler("compile_for")
    return triton.compile(spec.source(), target=GPUTarget("cuda", capability, 32), options=dict(spec.options))


# --- Occupancy ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of one compute capability (CUDA C++ Programming Guide, "Technical Specifications per
    Compute Capability") and the allocation rules of the CUDA occupancy calculator (cuda_occupancy.h)."""

    max_warps: int
    max_blocks: int
    shared_bytes: int  # per SM, at the largest shared-memory carveout
    max_shared_per_block: int  # the opt-in maximum one block may ask for
    registers: int = 65536
    register_sub_partitions: int = 4  # a warp's registers come from one of these quarters of the file
    register_granularity: int = 256  # registers per warp are allocated in units of this
    shared_reserved_per_block: int = KIB  # the driver's own, from sm_80 on
    shared_granularity: int = 128


SM_LIMITS = {
    80: SmLimits(max_warps=64, max_blocks=32, shared_bytes=164 * KIB, max_shared_per_block=163 * KIB),
    86: SmLimits(max_warps=48, max_blocks=16, shared_bytes=100 * KIB, max_shared_per_block=99 * KIB),
    89: SmLimits(max_warps=48, max_blocks=24, shared_bytes=100 * KIB, max_shared_per_block=99 * KIB),
    90: SmLimits(max_warps=64, max_blocks=32, shared_bytes=228 * KIB, max_shared_per_block=227 * KIB),
}


@dataclass(frozen=True)
class Occupancy:
    """Theoretical occupancy of one SM by one kernel."""

    blocks_per_sm: int
    warps_per_sm: int
    fraction: float  # of the SM's maximum resident warps
    limited_by: tuple[str, ...]  # those of "warps", "blocks", "registers", "shared memory" that set blocks_per_sm


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy_on(capability: int, *, num_warps: int, registers: int, shared_bytes: int) -> Occupancy:
    """Resident blocks and warps per SM for blocks of ``num_warps`` warps using ``registers`` per thread and
    ``shared_bytes`` of shared memory, as the CUDA occupancy calculator computes them."""
    limits = SM_LIMITS.get(capability)
    if limits is None:
        raise ValueError(f"occupancy_on: no SM limits known for sm_{capability}; known: {sorted(SM_LIMITS)}")
    if num_warps < 1:
        raise ValueError(f"occupancy_on: expected num_warps >= 1, got {num_warps}")
    partitions = limits.register_sub_partitions
    registers_per_warp = _round_up(registers * 32, limits.register_granularity)
    if registers_per_warp == 0:
        by_registers = limits.max_blocks
    elif registers_per_warp * _round_up(num_warps, partitions) > limits.registers:
        by_registers = 0  # the hardware refuses the launch
    else:
        warps_per_partition = limits.registers // partitions // registers_per_warp
        by_registers = warps_per_partition * partitions // num_warps
    if shared_bytes > limits.max_shared_per_block:
        by_shared = 0
    else:
        shared_per_block = _round_up(shared_bytes + limits.shared_reserved_per_block, limits.shared_granularity)
        by_shared = limits.shared_bytes // shared_per_block
    by_limit = {"warps": limits.max_warps // num_warps, "blocks": limits.max_blocks, "registers": by_registers,
                "shared memory": by_shared}
    blocks = min(by_limit.values())
    return Occupancy(blocks_per_sm=blocks, warps_per_sm=blocks * num_warps,
                     fraction=blocks * num_warps / limits.max_warps,
                     limited_by=tuple(name for name, count in by_limit.items() if count == blocks))


# --- Reading the cubin -------------------------------------------------------------------------------------

# "        /*0290*/              @!P0 LDG.E.128 R4, desc[UR4][R6.64] ;   /* 0x... */"
_SASS_INSTRUCTION = re.compile(r"^\s*/\*(?P<address>[0-9a-f]+)\*/\s+(?:@!?\w+\s+)?"
                               r"(?P<opcode>[A-Z][A-Z0-9_]*(?:\.\w+)*)(?P<operands>[^;]*);", re.MULTILINE)
# Global accesses. Generic LD/ST are counted with them: Triton emits them only for global pointers.
_GLOBAL_LOADS = {"LDG", "LDGSTS", "LD"}
_GLOBAL_STORES = {"STG", "ST"}
_LOCAL_ACCESSES = {"LDL", "STL"}
_ATOMICS = {"ATOMG", "ATOM", "RED", "REDG"}
# The modifier that gives an access's width; an access without one moves 32 bits. Others (E: 64-bit address,
# CONSTANT, EL, LTC128B: cache policies, ...) do not change the width.
_WIDTH_MODIFIERS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}
_WIDTH_LIKE = re.compile(r"[US]?\d+")


def _access_width(opcode: str) -> int:
    modifiers = opcode.split(".")[1:]
    strange = [m for m in modifiers if _WIDTH_LIKE.fullmatch(m) and m not in _WIDTH_MODIFIERS]
    widths = [_WIDTH_MODIFIERS[m] for m in modifiers if m in _WIDTH_MODIFIERS]
    if strange or len(widths) > 1:
        raise ValueError(f"analyse: cannot tell the width of SASS instruction {opcode} (width modifiers "
                         f"{[m for m in modifiers if _WIDTH_LIKE.fullmatch(m)]})")
    return widths[0] if widths else 32


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory(prefix="fusedres-cubin-") as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([tool, flag, str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"analyse: {tool} {flag} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _resource_usage(cubin: bytes, function: str) -> dict[str, int]:
    """``cuobjdump -res-usage``'s counts for ``function``, e.g. {"REG": 40, "STACK": 0, "SHARED": 0, ...}:
        Function _bn_act_apply_kernel:
          REG:114 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0"""
    listing = _cuobjdump(cubin, "-res-usage")
    functions = {match["name"]: dict((key, int(value)) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)",
                                                                                   match["usage"]))
                 for match in re.finditer(r"^\s*Function (?P<name>\S+):\s*\n(?P<usage>.*)$", listing, re.MULTILINE)}
    usage = functions.get(function)
    if usage is None:
        raise ValueError(f"analyse: cuobjdump -res-usage lists no function {function}, only {sorted(functions)}")
    missing = [key for key in ("REG", "STACK", "SHARED", "LOCAL") if key not in usage]
    if missing:
        raise ValueError(f"analyse: cuobjdump -res-usage gives no {missing} for {function}: {usage}")
    return usage


def _loop_ranges(instructions: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """The address ranges of loops: from a backward branch's target to the branch. (A branch to itself is the
    trap loop ptxas puts after the last EXIT, not a loop of the kernel.)"""
    ranges = []
    for address, opcode, operands in instructions:
        target = re.fullmatch(r"\s*(0x[0-9a-f]+)\s*", operands)
        if opcode.split(".")[0] == "BRA" and target and int(target[1], 16) < address:
            ranges.append((int(target[1], 16), address))
    return ranges


@dataclass(frozen=True)
class KernelAnalysis:
    """What the compiler made of one kernel. Per thread: registers, stack and local bytes; per block: shared
    bytes. Access widths are histograms ``{bits: instructions}`` over the SASS (static instructions, not
    executions); those inside loops are the streaming accesses (the per-channel vectors are read once, before
    the loop), which is how the kernel report tells activation accesses from the others."""

    name: str
    capability: int
    num_warps: int
    registers: int  # cuobjdump REG
    stack_bytes: int  # cuobjdump STACK: the stack frame, where spills go
    local_bytes: int  # cuobjdump LOCAL: other local memory
    shared_bytes: int  # static (cuobjdump SHARED) plus Triton's dynamic shared memory (metadata "shared")
    load_widths: dict[int, int]  # LDG, LDGSTS, generic LD
    store_widths: dict[int, int]  # STG, generic ST
    loop_load_widths: dict[int, int]  # those of the loads inside a loop (a backward branch's range) before the
    #                                   first atomic (after it: a last-program merge, reading partial rows)
    loop_store_widths: dict[int, int]  # likewise for the stores
    merge_loads: dict[str, int] = field(default_factory=dict)  # opcode -> instructions of the loads in the loops
    #                                after the first atomic: a last-program merge reading other programs' rows
    local_accesses: dict[str, int] = field(default_factory=dict)  # LDL/STL opcode -> instructions
    atomics: dict[str, int] = field(default_factory=dict)  # ATOMG/ATOM/RED/REDG opcode -> instructions
    occupancy: Occupancy | None = None  # None where SM_LIMITS does not know the capability

    @property
    def local_memory_bytes(self) -> int:
        """Local memory per thread (spills and anything else ptxas put there)."""
        return self.stack_bytes + self.local_bytes


def analyse(compiled: CompiledKernel) -> KernelAnalysis:
    """Read registers, local and shared memory, and the global access widths off ``compiled``'s cubin."""
    metadata = compiled.metadata
    if metadata.target.backend != "cuda" or "cubin" not in compiled.asm:
        raise ValueError(f"analyse: expected a kernel compiled for a CUDA target, got one for {metadata.target}")
    cubin = compiled.asm["cubin"]
    usage = _resource_usage(cubin, metadata.name)
    # n_regs exists only once the kernel was loaded on a GPU; where it does, it must agree with the cubin.
    loaded_registers = getattr(compiled, "n_regs", None)
    if loaded_registers is not None and loaded_registers != usage["REG"]:
        raise ValueError(f"analyse: {metadata.name}: the driver reports {loaded_registers} registers, "
                         f"cuobjdump {usage['REG']}")
    loads, stores, local, atomics = Counter(), Counter(), Counter(), Counter()
    loop_loads, loop_stores = Counter(), Counter()
    instructions = [(int(m["address"], 16), m["opcode"], m["operands"])
                    for m in _SASS_INSTRUCTION.finditer(_cuobjdump(cubin, "-sass"))]
    loops = _loop_ranges(instructions)
    # A last-program merge comes after the ticket (the first atomic): its loops read partial rows, not activations.
    atomics_at = [address for address, opcode, _ in instructions if opcode.split(".")[0] in _ATOMICS]
    merge_loops = [(first, last) for first, last in loops if atomics_at and first > atomics_at[0]]
    if atomics_at:
        loops = [(first, last) for first, last in loops if first < atomics_at[0]]
    merge_loads = Counter()
    for address, opcode, _ in instructions:
        base = opcode.split(".")[0]
        in_loop = any(first <= address <= last for first, last in loops)
        if base in _GLOBAL_LOADS:
            loads[_access_width(opcode)] += 1
            loop_loads[_access_width(opcode)] += in_loop
            merge_loads[opcode] += any(first <= address <= last for first, last in merge_loops)
        elif base in _GLOBAL_STORES:
            stores[_access_width(opcode)] += 1
            loop_stores[_access_width(opcode)] += in_loop
        elif base in _LOCAL_ACCESSES:
            local[opcode] += 1
        elif base in _ATOMICS:
            atomics[opcode] += 1
    capability = metadata.target.arch
    shared = usage["SHARED"] + (metadata.shared or 0)
    occupancy = occupancy_on(capability, num_warps=metadata.num_warps, registers=usage["REG"],
                             shared_bytes=shared) if capability in SM_LIMITS else None
    return KernelAnalysis(name=metadata.name, capability=capability, num_warps=metadata.num_warps,
                          registers=usage["REG"], stack_bytes=usage["STACK"], local_bytes=usage["LOCAL"],
                          shared_bytes=shared, load_widths=dict(sorted(loads.items())),
                          store_widths=dict(sorted(stores.items())),
                          loop_load_widths={bits: n for bits, n in sorted(loop_loads.items()) if n},
                          loop_store_widths={bits: n for bits, n in sorted(loop_stores.items()) if n},
                          merge_loads={opcode: n for opcode, n in merge_loads.items() if n}, local_accesses=dict(local),
                          atomics=dict(atomics), occupancy=occupancy)


# --- Many launches -----------------------------------------------------------------------------------------


def _compile_and_analyse(spec: Specialisation, capability: int) -> KernelAnalysis:
    try:
        return analyse(compile_for(spec, capability))
    except Exception as error:  # name the variant; Triton's own errors do not always survive pickling
        raise RuntimeError(f"compile_for: {spec.name} (num_warps={spec.num_warps}, {spec.constexpr_values}) "
                           f"for sm_{capability}: {type(error).__name__}: {error}") from error


def analyse_all(specs: Iterable[Specialisation], *, capability: int = 90, jobs: int = 2) -> list[KernelAnalysis]:
    """The analysis of each specialisation, in order. Each distinct one (by ``key``) is compiled once, since
    compiling takes seconds, ``jobs`` at a time in worker processes."""
    if jobs < 1:
        raise ValueError(f"analyse_all: expected jobs >= 1, got {jobs}")
    specs = list(specs)
    distinct = list({spec.key: spec for spec in specs}.values())
    if jobs == 1 or len(distinct) < 2:
        results = [_compile_and_analyse(spec, capability) for spec in distinct]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_compile_and_analyse, distinct, [capability] * len(distinct)))
    by_key = {spec.key: result for spec, result in zip(distinct, results)}
    return [by_key[spec.key] for spec in specs]

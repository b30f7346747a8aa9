"""Where Triton's interpreter computes differently from a GPU, and what fusedres does about it (docs/design.md,
"Tests"). Only imported when the process runs the interpreter (``TRITON_INTERPRET=1``).

fp32 -> bf16 casts: the interpreter truncates (its round-to-nearest path also misses the carry into the exponent
and ties to even), where the GPU's ``cvt.rn.bf16.f32`` rounds to nearest even. Left alone, every bf16 result on
the CPU would be biased toward zero by up to one ulp, and the tests and the benchmark's CPU run would measure the
interpreter rather than the kernels. ``round_bf16_to_nearest_even`` makes the interpreter round as the GPU does
(through torch's own conversion, which rounds to nearest even)."""
from __future__ import annotations

import numpy as np
import torch
import triton.language as tl


def round_bf16_to_nearest_even() -> bool:
    """Patch the interpreter's float conversion for fp32 -> bf16 (once); False where this Triton has none."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_convert_float", None)
    if original is None:
        return False
    if getattr(original, "fusedres_rounds_bf16", False):
        return True

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32))
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    convert_float.fusedres_rounds_bf16 = True
    interpreter._convert_float = convert_float
    return True

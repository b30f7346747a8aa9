"""Diagnostics, outside the runtime: what the GPU compiler makes of the kernels (``compiled``: the JIT's own
specialisation of a recorded launch, compiled for an NVIDIA target and read from the cubin), and the kernel report
built on it (``kernel_report``: launches, bytes, registers, access widths per op on ResNet-50's sites, and the
limits the kernels are held to). ``tests/aot_compile.py`` compiles every kernel variant through the same
specialisation. Nothing here is imported by the library's runtime."""

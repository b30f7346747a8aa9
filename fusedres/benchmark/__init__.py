"""The benchmark harness behind the ``fusedres-bench`` command: fusedres against eager PyTorch and
``torch.compile``, through the public API only. Scripts, notes and committed results live in ``bench/``."""

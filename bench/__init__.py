"""The sdpo_ops benchmark suite (pytest-benchmark): ``make bench``, ``python -m bench.cpu_ratio``,
``python -m bench.gpu_targets``. A package so that its modules import each other and run with ``-m``."""

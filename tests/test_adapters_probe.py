"""The readiness probe on a tiny model: its counts against the reward calls it made, its verdicts at the extremes."""

import pytest
import torch
from adapters_tiny import PROMPTS, make_model, make_tokenizer

from sdpo_ops.adapters.probe import readiness_probe

GROUP = 4


class RecordingReward:
    """Success when the reply has an even number of characters; feedback for failures whose length is 1 mod 3."""

    def __init__(self, *, never_succeed=False, feedback=True):
        self.calls = []
        self.never_succeed, self.feedback = never_succeed, feedback

    def __call__(self, completions, **kwargs):
        scores = [0.0 if self.never_succeed else float(len(text) % 2 == 0) for text in completions]
        notes = [
            "Too long." if self.feedback and score == 0 and len(text) % 3 == 1 else None
            for text, score in zip(completions, scores, strict=True)
        ]
        self.calls.append((scores, notes))
        return [{"score": s, "feedback": f} for s, f in zip(scores, notes, strict=True)]


def _expected_signal(scores, notes):
    """SDPO's rule, written out: another success in the group, else feedback."""
    signal = []
    for i, note in enumerate(notes):
        group = range(i // GROUP * GROUP, (i // GROUP + 1) * GROUP)
        sibling = any(scores[j] >= 0.5 for j in group if j != i)
        signal.append(sibling or note is not None)
    return signal


def test_probe_counts_match_its_reward_calls():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    rows = [{"prompt": [{"role": "user", "content": text}], "tag": i} for i, text in enumerate(PROMPTS)]
    reward = RecordingReward()
    report = readiness_probe(model, tokenizer, rows, reward, group_size=GROUP, max_new_tokens=8, topk=5)
    sampled, greedy = reward.calls[0], reward.calls[1]
    assert len(sampled[0]) == len(PROMPTS) * GROUP and len(greedy[0]) == len(PROMPTS)
    signal = _expected_signal(*sampled)
    assert report.signal_fraction == pytest.approx(sum(signal) / len(signal))
    failures = [score for score in greedy[0] if score < 0.5]
    assert report.greedy_failures == len(failures)
    solved = sum(score >= 0.5 for score in reward.calls[2][0]) if failures else 0
    assert report.teacher_solves_failures == solved
    assert 0 < sum(signal) < len(signal), "the schedule should give some completions a teacher and some not"
    assert report.mean_divergence > 0 and torch.isfinite(torch.tensor(report.teacher_logprob_advantage))


def test_probe_verdict_without_any_signal():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    rows = [{"prompt": [{"role": "user", "content": text}]} for text in PROMPTS[:2]]
    report = readiness_probe(
        model,
        tokenizer,
        rows,
        RecordingReward(never_succeed=True, feedback=False),
        group_size=GROUP,
        max_new_tokens=4,
        topk=5,
    )
    assert report.signal_fraction == 0.0 and report.verdict.startswith("NOT READY")
    assert report.greedy_failures == 2 and report.teacher_solves_failures == 0

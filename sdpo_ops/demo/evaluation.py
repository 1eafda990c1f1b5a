"""Greedy accuracy on a fixed held-out set of problems: the demo's learning curve.

The per-batch sampled reward of a CPU-sized run is a mean over a few replies to two problems and swings
with the problems drawn; greedy replies to the same held-out problems at every evaluation remove both
sources of noise, so a change in this accuracy is a change in the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sdpo_ops.demo.task import SCORE_CORRECT, Problem, build_prompt, generate_problems, score_completion

# One held-out set for every training seed, so seed-to-seed differences are differences in training only.
HELD_OUT_SEED = 1_000_003


def held_out_problems(n: int, *, max_operand: int) -> list[Problem]:
    """The first ``n`` problems of the fixed held-out set (training excludes their questions)."""
    return generate_problems(n, seed=HELD_OUT_SEED, max_operand=max_operand)


def training_problems(n: int, seed: int, *, max_operand: int, held_out: Sequence[Problem]) -> list[Problem]:
    """``n`` problems drawn with ``seed`` whose questions are none of the held-out ones."""
    excluded = {problem.question for problem in held_out}
    problems: list[Problem] = []
    drawn = n
    while len(problems) < n:
        if drawn > 64 * (n + len(excluded)):
            raise ValueError(f"cannot draw {n} training problems outside the {len(excluded)} held-out questions")
        # Redraw a longer prefix of the same seeded list: the result depends only on (n, seed, held_out).
        problems = [
            p for p in generate_problems(drawn, seed=seed, max_operand=max_operand) if p.question not in excluded
        ]
        drawn *= 2
    return problems[:n]


def score_replies(problems: Sequence[Problem], texts: Sequence[str]) -> dict:
    """``{"accuracy", "replies": [{"solution", "reply", "correct"}]}`` for one reply per problem."""
    replies = []
    for problem, text in zip(problems, texts, strict=True):
        score, _ = score_completion(text, problem.answer, problem.solution)
        replies.append({"solution": problem.solution, "reply": text, "correct": score == SCORE_CORRECT})
    accuracy = sum(reply["correct"] for reply in replies) / len(replies) if replies else None
    return {"accuracy": accuracy, "replies": replies}


def greedy_replies(model, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int, batch_size: int = 16):
    """The model's greedy reply text to each problem (its chat prompt), in order."""
    import torch
    from transformers import GenerationConfig

    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    texts: list[str] = []
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            encoded = tokenizer.apply_chat_template(
                [build_prompt(problem) for problem in chunk],
                add_generation_prompt=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            ).to(model.device)
            with torch.no_grad():
                output = model.generate(**encoded, generation_config=generation_config)
            texts.extend(tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return texts


def evaluate(model, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int) -> dict:
    """Greedy accuracy of ``model`` on ``problems`` with every reply and its verdict (see :func:`score_replies`)."""
    return score_replies(problems, greedy_replies(model, tokenizer, problems, max_new_tokens=max_new_tokens))


def paired_gain(before: Sequence[bool], after: Sequence[bool]) -> tuple[float, float]:
    """``(gain, standard error)`` of the accuracy change between two verdict lists on the same problems.

    The error is the paired one (only problems whose verdict changed carry information):
    ``sqrt(n01 + n10 - (n01 - n10)^2 / n) / n`` with ``n01`` problems gained and ``n10`` lost.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"need two non-empty verdict lists of one length, got {len(before)} and {len(after)}")
    n = len(before)
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    variance = max(0.0, gained + lost - (gained - lost) ** 2 / n)
    return (gained - lost) / n, math.sqrt(variance) / n

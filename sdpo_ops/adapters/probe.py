"""Will SDPO have something to learn from? A readiness probe, run before training on one's own model, prompts, reward.

It samples a group per prompt, scores it, builds the teacher contexts as training would
(:func:`sdpo_ops.adapters.build_teacher_batch`: a successful sibling's reply, else the feedback), and measures:

- the share of sampled completions that get a teacher signal (SDPO is inactive without one);
- the teacher-student gap on the sampled tokens, the initial teacher being the model itself reprompted: the mean
  divergence the loss would start from, and the teacher's mean log-prob advantage on the sampled tokens;
- whether the reprompted model solves, greedily, the prompts the model fails greedily (the "performance gap"
  that arXiv:2605.30070 finds to predict the gain of on-policy self-distillation linearly).

The verdict's thresholds are rules of thumb, not calibrated: a gap says there is a signal, not that the model
learns from it faster than from the scalar reward (see the README's demo comparison).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sdpo_ops.adapters.batch import build_sdpo_batch, build_teacher_batch, split_completions
from sdpo_ops.adapters.feedback import split_scores_and_feedback
from sdpo_ops.adapters.reprompt import (
    TRL_FEEDBACK_TEMPLATE,
    TRL_REPROMPT_TEMPLATE,
    TRL_SOLUTION_TEMPLATE,
    build_teacher_messages,
)
from sdpo_ops.adapters.step import sdpo_step


@dataclass
class ProbeReport:
    """What :func:`readiness_probe` measured (fractions in [0, 1], log-probs and divergences in nats per token)."""

    prompts: int
    completions: int
    success_fraction: float
    signal_fraction: float
    failed_with_signal_fraction: float
    mean_divergence: float
    teacher_logprob_advantage: float
    greedy_accuracy: float
    greedy_failures: int
    teacher_solves_failures: int
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _generate(model, tokenizer, prompts: Sequence[Any], *, sample: bool, temperature: float, max_new_tokens: int):
    """Completion token ids (cut after EOS) for chat-message prompts, one per prompt."""
    from transformers import GenerationConfig

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer.apply_chat_template(
            list(prompts), add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        ).to(model.device)
    finally:
        tokenizer.padding_side = padding_side
    config = GenerationConfig(
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        output = model.generate(**encoded, generation_config=config)
    return split_completions(output, encoded["input_ids"].shape[1], tokenizer.eos_token_id)


def _score(reward_func: Callable, tokenizer, completions, columns: dict[str, list]) -> tuple[list[float], list]:
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return split_scores_and_feedback(reward_func(completions=texts, **columns))


def readiness_probe(
    model,
    tokenizer,
    rows: Sequence[dict],
    reward_func: Callable,
    *,
    group_size: int = 8,
    temperature: float = 0.7,
    max_new_tokens: int = 40,
    success_threshold: float = 0.5,
    seed: int = 0,
    **loss_options: Any,
) -> ProbeReport:
    """Probe ``model`` on ``rows`` (dataset rows: ``prompt`` chat messages plus the reward's columns).

    ``reward_func`` is called TRL's way (``completions=texts`` and the rows' other columns) and may return feedback
    (``{"score", "feedback"}`` dicts or :class:`sdpo_ops.adapters.RewardWithFeedback`). Teacher contexts use TRL's
    templates; ``loss_options`` go to :func:`sdpo_ops.sdpo_loss` (``topk``, ``alpha``, ``temperature``...).
    """
    if not rows or group_size < 2:
        raise ValueError(f"need rows and group_size >= 2, got {len(rows)} rows, group_size={group_size}")
    columns = [key for key in rows[0] if key != "prompt"]
    prompts = [row["prompt"] for row in rows for _ in range(group_size)]
    grouped_columns = {key: [row[key] for row in rows for _ in range(group_size)] for key in columns}
    was_training = model.training
    model.eval()
    try:
        torch.manual_seed(seed)
        completions = _generate(
            model, tokenizer, prompts, sample=True, temperature=temperature, max_new_tokens=max_new_tokens
        )
        scores, feedback = _score(reward_func, tokenizer, completions, grouped_columns)
        templates = {
            "reprompt_template": TRL_REPROMPT_TEMPLATE,
            "solution_template": TRL_SOLUTION_TEMPLATE,
            "feedback_template": TRL_FEEDBACK_TEMPLATE,
        }
        teacher = build_teacher_batch(
            tokenizer,
            prompts,
            completions,
            scores,
            group_size,
            feedback=feedback,
            success_threshold=success_threshold,
            **templates,
        )
        prompt_ids = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in prompts
        ]
        batch = build_sdpo_batch(prompt_ids, teacher, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            result = sdpo_step(model, model, batch, reduction="token-mean", temperature=temperature, **loss_options)
        mask = result.loss_mask
        tokens = mask.sum().clamp(min=1.0)
        advantage = ((result.output.teacher_target_logprobs - result.output.target_logprobs) * mask).sum() / tokens

        success = torch.tensor([score >= success_threshold for score in scores])
        signal = teacher.self_distillation_mask.bool().cpu()
        failed = ~success
        failed_with_signal = (failed & signal).sum().item() / max(failed.sum().item(), 1)

        # Greedy: the model alone, then reprompted on each prompt it fails, with what training would show it.
        greedy = _generate(
            model,
            tokenizer,
            [row["prompt"] for row in rows],
            sample=False,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
        )
        greedy_scores, greedy_feedback = _score(
            reward_func, tokenizer, greedy, {k: [r[k] for r in rows] for k in columns}
        )
        failures = [i for i, score in enumerate(greedy_scores) if score < success_threshold]
        teacher_prompts = []
        for i in failures:
            group = range(i * group_size, (i + 1) * group_size)
            demo = next((j for j in group if scores[j] >= success_threshold), None)
            demonstration = None if demo is None else tokenizer.decode(completions[demo], skip_special_tokens=True)
            teacher_prompts.append(
                build_teacher_messages(
                    rows[i]["prompt"],
                    demonstration,
                    greedy_feedback[i],
                    reprompt_template=templates["reprompt_template"],
                    solution_template=templates["solution_template"],
                    feedback_template=templates["feedback_template"],
                )
            )
        solved = 0
        if failures:
            replies = _generate(
                model, tokenizer, teacher_prompts, sample=False, temperature=1.0, max_new_tokens=max_new_tokens
            )
            reply_scores, _ = _score(
                reward_func, tokenizer, replies, {k: [rows[i][k] for i in failures] for k in columns}
            )
            solved = sum(score >= success_threshold for score in reply_scores)
    finally:
        model.train(was_training)

    signal_fraction = signal.float().mean().item()
    solve_rate = solved / len(failures) if failures else 0.0
    if signal_fraction < 0.05 or (failures and solved == 0):
        verdict = "NOT READY: SDPO would see (almost) no teacher signal"
    elif signal_fraction >= 0.25 and solve_rate >= 0.25:
        verdict = "SIGNAL: the reprompted model knows better; whether it learns faster than from the reward is open"
    else:
        verdict = "WEAK: a small teacher signal"
    verdict += (
        f" ({signal_fraction:.0%} of completions with a teacher; reprompted, it solves {solved}/{len(failures)} of "
        f"the greedy failures; teacher log-prob advantage {advantage.item():+.3f} nats/token)"
    )
    return ProbeReport(
        prompts=len(rows),
        completions=len(prompts),
        success_fraction=success.float().mean().item(),
        signal_fraction=signal_fraction,
        failed_with_signal_fraction=failed_with_signal,
        mean_divergence=result.loss.item(),
        teacher_logprob_advantage=advantage.item(),
        greedy_accuracy=1 - len(failures) / len(rows),
        greedy_failures=len(failures),
        teacher_solves_failures=solved,
        verdict=verdict,
    )

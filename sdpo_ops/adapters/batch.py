"""Padded tensors for one SDPO step: the student's and the teacher's inputs over the same completions.

Layout (the one of TRL and verl): prompts are left-padded, completions right-padded, and each input is
``prompt + completion``. The completions therefore occupy the *last* ``T`` columns of both the student's
``[B, Ls]`` and the teacher's ``[B, Lt]`` inputs, whatever the prompt lengths, and the hidden state at
column ``p`` predicts the token at column ``p + 1``: columns ``[L - T - 1, L - 1)`` predict the completion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from sdpo_ops.adapters.demonstrations import OFFICIAL_SUCCESS_THRESHOLD, select_demonstrations, sequence_rewards
from sdpo_ops.adapters.reprompt import (
    DEFAULT_MAX_REPROMPT_LEN,
    FEEDBACK_TEMPLATE,
    REPROMPT_TEMPLATE,
    SOLUTION_TEMPLATE,
    Prompt,
    build_teacher_messages,
    build_teacher_prompt_ids,
    feedback_to_use,
    has_feedback,
)

TokenIds = Sequence[int] | Tensor


def _as_id_list(ids: TokenIds) -> list[int]:
    return ids.tolist() if isinstance(ids, Tensor) else [int(i) for i in ids]


def pad_sequences(
    sequences: Sequence[TokenIds],
    *,
    padding_value: int,
    side: Literal["left", "right"],
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(ids [B, L], mask [B, L])`` of int64 sequences padded on ``side`` to the longest (at least 1 column)."""
    rows = [_as_id_list(seq) for seq in sequences]
    width = max([len(row) for row in rows] + [1])
    ids = torch.full((len(rows), width), padding_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if not row:
            continue
        columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[index, columns] = torch.tensor(row, dtype=torch.long)
        mask[index, columns] = 1
    return ids.to(device), mask.to(device)


def split_completions(
    sequences: Tensor, prompt_width: int, eos_token_ids: int | Sequence[int] | None
) -> list[list[int]]:
    """Completion ids of each ``model.generate`` output row, cut after the first EOS (kept, TRL's rule).

    Args:
        sequences: ``[B, prompt_width + T]`` what ``generate`` returned for left-padded prompts.
        prompt_width: the padded prompt width (``input_ids.shape[1]``).
        eos_token_ids: the id(s) that end a completion; None keeps all ``T`` tokens.
    """
    completions = sequences[:, prompt_width:].tolist()
    if eos_token_ids is None:
        return completions
    stops = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids)
    cut = []
    for row in completions:
        end = next((position + 1 for position, token in enumerate(row) if token in stops), len(row))
        cut.append(row[:end])
    return cut


@dataclass
class TeacherBatch:
    """The teacher's inputs for a batch of ``B`` completions of at most ``T`` tokens.

    Attributes:
        input_ids: ``[B, Lt]`` int64, left-padded teacher prompt + right-padded completion.
        attention_mask: ``[B, Lt]`` int64.
        completion_ids: ``[B, T]`` int64, right-padded (pad id where ``completion_mask`` is 0).
        completion_mask: ``[B, T]`` int64.
        self_distillation_mask: ``[B]`` float32, 1 for samples with a demonstration or used feedback.
        demonstration_indices: per sample, the batch index of its demonstration, or None.
        feedback_used: per sample, whether its feedback went into the teacher's prompt.
        teacher_prompts: per sample, the teacher's prompt (messages or text) before tokenization.
        metrics: fractions of the batch (TRL's and the official code's ``self_distillation/*`` names).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    self_distillation_mask: Tensor
    demonstration_indices: list[int | None]
    feedback_used: list[bool]
    teacher_prompts: list[Prompt]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_completion_tokens(self) -> int:
        """``T``: the completion occupies the last ``T`` columns of :attr:`input_ids`."""
        return self.completion_ids.shape[1]


@dataclass
class SDPOBatch:
    """Everything :func:`sdpo_ops.adapters.sdpo_step` reads.

    Attributes:
        input_ids: ``[B, Ls]`` student input, left-padded prompt + right-padded completion.
        attention_mask: ``[B, Ls]``.
        completion_ids: ``[B, T]`` the sampled tokens (the last ``T`` columns of both inputs).
        completion_mask: ``[B, T]``.
        teacher_input_ids: ``[B, Lt]`` teacher input, same completions in the last ``T`` columns.
        teacher_attention_mask: ``[B, Lt]``.
        self_distillation_mask: ``[B]`` samples with a teacher signal (others are masked out).
        old_logprobs: ``[B, T]`` optional: the rollout policy's log-probs of the sampled tokens, for the
            importance-sampling correction (needed only when the policy moved since sampling).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    teacher_input_ids: Tensor
    teacher_attention_mask: Tensor
    self_distillation_mask: Tensor | None = None
    old_logprobs: Tensor | None = None

    def __post_init__(self):
        batch, width = self.completion_ids.shape
        for name in ("input_ids", "attention_mask", "teacher_input_ids", "teacher_attention_mask"):
            tensor = getattr(self, name)
            if tensor.dim() != 2 or tensor.shape[0] != batch or tensor.shape[1] <= width:
                raise ValueError(
                    f"{name} must be [B={batch}, L > T={width}] (a prompt of at least one token before the "
                    f"completion), got {tuple(tensor.shape)}"
                )
        if self.completion_mask.shape != self.completion_ids.shape:
            raise ValueError(f"completion_mask {tuple(self.completion_mask.shape)} != completion_ids {(batch, width)}")
        if self.self_distillation_mask is not None and self.self_distillation_mask.shape != (batch,):
            raise ValueError(
                f"self_distillation_mask must be [B={batch}], got {tuple(self.self_distillation_mask.shape)}"
            )
        if self.old_logprobs is not None and self.old_logprobs.shape != (batch, width):
            raise ValueError(f"old_logprobs must be [B, T]={(batch, width)}, got {tuple(self.old_logprobs.shape)}")

    def self_distillation_mask_or_ones(self) -> Tensor:
        """``[B]`` float: :attr:`self_distillation_mask`, or ones when it is None (every sample has a teacher)."""
        if self.self_distillation_mask is None:
            return torch.ones(self.completion_ids.shape[0], device=self.completion_ids.device)
        return self.self_distillation_mask.float()

    def to(self, device: torch.device | str) -> SDPOBatch:
        """A copy with every tensor on ``device``."""
        moved = {name: None if value is None else value.to(device) for name, value in self.__dict__.items()}
        return SDPOBatch(**moved)


def build_teacher_batch(
    tokenizer,
    prompts: Sequence[Prompt],
    completions: Sequence[TokenIds],
    rewards: Sequence[float | None] | Tensor,
    group_size: int,
    *,
    feedback: Sequence[str | None] | None = None,
    demonstration_texts: Sequence[str] | None = None,
    success_threshold: float = OFFICIAL_SUCCESS_THRESHOLD,
    dont_reprompt_on_self_success: bool = True,
    include_environment_feedback: bool = True,
    environment_feedback_only_without_solution: bool = True,
    remove_thinking_from_demonstration: bool = True,
    reprompt_template: str = REPROMPT_TEMPLATE,
    solution_template: str = SOLUTION_TEMPLATE,
    feedback_template: str = FEEDBACK_TEMPLATE,
    max_reprompt_len: int | None = DEFAULT_MAX_REPROMPT_LEN,
    truncation: Literal["left", "right"] = "left",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> TeacherBatch:
    """Reprompt the teacher of every sample and pad the teacher's inputs (SPEC section 4).

    Args:
        tokenizer: the model's tokenizer (``pad_token_id`` set; a chat template for message prompts).
        prompts: ``B`` prompts, each repeated for the ``group_size`` consecutive samples of its group.
        completions: ``B`` completion token ids (lists or 1-D tensors, unpadded).
        rewards: ``B`` sequence rewards (or a ``[B, T]`` tensor of token rewards, summed).
        group_size: samples per prompt.
        feedback: ``B`` feedback strings (None or empty where there is none), e.g. the second list of
            :func:`sdpo_ops.adapters.split_scores_and_feedback`.
        demonstration_texts: ``B`` texts to show as demonstrations; default: each completion decoded with
            ``skip_special_tokens=True`` (what TRL and the official code show).
        success_threshold, dont_reprompt_on_self_success: see :func:`select_demonstrations`.
        include_environment_feedback, environment_feedback_only_without_solution,
        remove_thinking_from_demonstration, reprompt_template, solution_template, feedback_template: see
            :func:`sdpo_ops.adapters.build_teacher_messages`.
        max_reprompt_len, truncation, chat_template_kwargs: see :func:`sdpo_ops.adapters.build_teacher_prompt_ids`.
        device: where the tensors go.

    Returns:
        A :class:`TeacherBatch`.
    """
    batch = len(prompts)
    if len(completions) != batch:
        raise ValueError(f"{batch} prompts but {len(completions)} completions")
    if feedback is not None and len(feedback) != batch:
        raise ValueError(f"{batch} prompts but {len(feedback)} feedback entries")
    if demonstration_texts is not None and len(demonstration_texts) != batch:
        raise ValueError(f"{batch} prompts but {len(demonstration_texts)} demonstration texts")
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad_token_id; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    if len(sequence_rewards(rewards)) != batch:
        raise ValueError(f"{batch} prompts but {len(sequence_rewards(rewards))} rewards")
    feedback = [None] * batch if feedback is None else list(feedback)
    completion_lists = [_as_id_list(ids) for ids in completions]

    demonstrations = select_demonstrations(
        rewards,
        group_size,
        success_threshold=success_threshold,
        dont_reprompt_on_self_success=dont_reprompt_on_self_success,
    )
    decoded: dict[int, str] = {}

    def demonstration_text(index: int) -> str:
        if demonstration_texts is not None:
            return demonstration_texts[index]
        if index not in decoded:
            decoded[index] = tokenizer.decode(completion_lists[index], skip_special_tokens=True)
        return decoded[index]

    teacher_prompts: list[Prompt] = []
    feedback_used: list[bool] = []
    for index in range(batch):
        demo_index = demonstrations[index]
        demonstration = None if demo_index is None else demonstration_text(demo_index)
        used = feedback_to_use(
            feedback[index],
            demonstration is not None,
            include_environment_feedback=include_environment_feedback,
            environment_feedback_only_without_solution=environment_feedback_only_without_solution,
        )
        feedback_used.append(used is not None)
        teacher_prompts.append(
            build_teacher_messages(
                prompts[index],
                demonstration,
                used,
                include_environment_feedback=True,
                environment_feedback_only_without_solution=False,
                remove_thinking_from_demonstration=remove_thinking_from_demonstration,
                reprompt_template=reprompt_template,
                solution_template=solution_template,
                feedback_template=feedback_template,
            )
        )
    prompt_ids = [
        build_teacher_prompt_ids(
            tokenizer,
            messages,
            max_reprompt_len=max_reprompt_len,
            truncation=truncation,
            chat_template_kwargs=chat_template_kwargs,
        )
        for messages in teacher_prompts
    ]
    teacher_prompt_ids, teacher_prompt_mask = pad_sequences(prompt_ids, padding_value=pad_token_id, side="left")
    completion_ids, completion_mask = pad_sequences(completion_lists, padding_value=pad_token_id, side="right")
    has_teacher = [demo is not None or used for demo, used in zip(demonstrations, feedback_used, strict=True)]
    self_distillation_mask = torch.tensor(has_teacher, dtype=torch.float32)

    rewards_list = sequence_rewards(rewards)
    num_groups = max(batch // group_size, 1)
    successful_groups = sum(
        any(reward >= success_threshold for reward in rewards_list[start : start + group_size])
        for start in range(0, batch, group_size)
    )
    denominator = max(batch, 1)
    metrics = {
        "self_distillation/success_group_fraction": successful_groups / num_groups,
        "self_distillation/success_sample_fraction": sum(d is not None for d in demonstrations) / denominator,
        "self_distillation/feedback_available_fraction": sum(has_feedback(f) for f in feedback) / denominator,
        "self_distillation/feedback_used_fraction": sum(feedback_used) / denominator,
        "self_distillation/reprompt_sample_fraction": sum(has_teacher) / denominator,
    }
    return TeacherBatch(
        input_ids=torch.cat([teacher_prompt_ids, completion_ids], dim=1).to(device),
        attention_mask=torch.cat([teacher_prompt_mask, completion_mask], dim=1).to(device),
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        self_distillation_mask=self_distillation_mask.to(device),
        demonstration_indices=demonstrations,
        feedback_used=feedback_used,
        teacher_prompts=teacher_prompts,
        metrics=metrics,
    )


def build_sdpo_batch(
    prompt_ids: Sequence[TokenIds],
    teacher_batch: TeacherBatch,
    *,
    pad_token_id: int,
    old_logprobs: Tensor | None = None,
) -> SDPOBatch:
    """Pair the student's prompts with a :class:`TeacherBatch` (same completions) into an :class:`SDPOBatch`.

    Args:
        prompt_ids: ``B`` student prompt token ids (unpadded), the prompts the completions were sampled from.
        teacher_batch: from :func:`build_teacher_batch`.
        pad_token_id: the tokenizer's pad id.
        old_logprobs: ``[B, T]`` optional rollout log-probs of the completion tokens.
    """
    if len(prompt_ids) != teacher_batch.completion_ids.shape[0]:
        raise ValueError(f"{len(prompt_ids)} prompts but {teacher_batch.completion_ids.shape[0]} completions")
    device = teacher_batch.completion_ids.device
    student_prompt_ids, student_prompt_mask = pad_sequences(
        prompt_ids, padding_value=pad_token_id, side="left", device=device
    )
    return SDPOBatch(
        input_ids=torch.cat([student_prompt_ids, teacher_batch.completion_ids], dim=1),
        attention_mask=torch.cat([student_prompt_mask, teacher_batch.completion_mask], dim=1),
        completion_ids=teacher_batch.completion_ids,
        completion_mask=teacher_batch.completion_mask,
        teacher_input_ids=teacher_batch.input_ids,
        teacher_attention_mask=teacher_batch.attention_mask,
        self_distillation_mask=teacher_batch.self_distillation_mask,
        old_logprobs=old_logprobs,
    )

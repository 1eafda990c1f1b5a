"""SDPO pieces for hand-written PyTorch training loops (no TRL needed).

- :class:`EMATeacher`: the EMA teacher (full copy, or a shadow of the trainable/LoRA weights);
- :func:`select_demonstrations`: which successful sibling rollout each sample's teacher sees;
- :func:`build_teacher_messages`, :func:`build_teacher_prompt_ids`, :func:`strip_thinking`: reprompting;
- :func:`build_teacher_batch`, :func:`build_sdpo_batch`: padded student and teacher inputs;
- :func:`head_inputs`, :func:`sdpo_loss_arguments`: from a Hugging Face model and prompt + completion ids to the
  arguments of :func:`sdpo_ops.sdpo_loss` (last hidden states shifted by one, lm_head, logit transform), for your
  own loss call; the pieces: :func:`backbone_and_head`, :func:`completion_hidden_states`,
  :func:`positions_from_mask`, :func:`logit_transform`;
- :func:`sdpo_step`: the loss from two backbone forwards and :func:`sdpo_ops.sdpo_loss`;
- :class:`RewardWithFeedback`, :func:`split_scores_and_feedback`: rewards that explain themselves;
- :func:`save_checkpoint`, :func:`load_checkpoint`: student, teacher, optimizer, step and RNG, written atomically.

The TRL trainer lives in ``sdpo_ops.adapters.trl`` and is imported explicitly (it needs ``trl``).
"""

from sdpo_ops.adapters.batch import (
    SDPOBatch,
    TeacherBatch,
    build_sdpo_batch,
    build_teacher_batch,
    pad_sequences,
    split_completions,
)
from sdpo_ops.adapters.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from sdpo_ops.adapters.demonstrations import (
    OFFICIAL_SUCCESS_THRESHOLD,
    TRL_SUCCESS_THRESHOLD,
    select_demonstrations,
    sequence_rewards,
)
from sdpo_ops.adapters.feedback import RewardWithFeedback, split_scores_and_feedback
from sdpo_ops.adapters.heads import LogitTransform, logit_transform
from sdpo_ops.adapters.model_inputs import (
    HeadInputs,
    backbone_and_head,
    completion_hidden_states,
    head_inputs,
    positions_from_mask,
    sdpo_loss_arguments,
)
from sdpo_ops.adapters.reprompt import (
    FEEDBACK_TEMPLATE,
    REPROMPT_TEMPLATE,
    SOLUTION_TEMPLATE,
    TRL_FEEDBACK_TEMPLATE,
    TRL_REPROMPT_TEMPLATE,
    TRL_SOLUTION_TEMPLATE,
    build_teacher_messages,
    build_teacher_prompt_ids,
    strip_thinking,
)
from sdpo_ops.adapters.step import SDPOStepOutput, sdpo_step
from sdpo_ops.adapters.teacher import EMATeacher

__all__ = [
    "FEEDBACK_TEMPLATE",
    "OFFICIAL_SUCCESS_THRESHOLD",
    "REPROMPT_TEMPLATE",
    "SOLUTION_TEMPLATE",
    "TRL_FEEDBACK_TEMPLATE",
    "TRL_REPROMPT_TEMPLATE",
    "TRL_SOLUTION_TEMPLATE",
    "TRL_SUCCESS_THRESHOLD",
    "EMATeacher",
    "HeadInputs",
    "LoadedCheckpoint",
    "LogitTransform",
    "RewardWithFeedback",
    "SDPOBatch",
    "SDPOStepOutput",
    "TeacherBatch",
    "backbone_and_head",
    "build_sdpo_batch",
    "build_teacher_batch",
    "build_teacher_messages",
    "build_teacher_prompt_ids",
    "completion_hidden_states",
    "head_inputs",
    "load_checkpoint",
    "logit_transform",
    "pad_sequences",
    "positions_from_mask",
    "save_checkpoint",
    "select_demonstrations",
    "sequence_rewards",
    "sdpo_loss_arguments",
    "sdpo_step",
    "split_completions",
    "split_scores_and_feedback",
    "strip_thinking",
]

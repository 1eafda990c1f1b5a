"""SDPO pieces for hand-written PyTorch training loops (no TRL needed).

- :class:`EMATeacher`: the EMA teacher (full copy, or a shadow of the trainable/LoRA weights);
- :func:`select_demonstrations`: which successful sibling rollout each sample's teacher sees;
- :func:`build_teacher_messages`, :func:`build_teacher_prompt_ids`, :func:`strip_thinking`: reprompting;
- :func:`build_teacher_batch`, :func:`build_sdpo_batch`: padded student and teacher inputs;
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
    "LoadedCheckpoint",
    "RewardWithFeedback",
    "SDPOBatch",
    "SDPOStepOutput",
    "TeacherBatch",
    "build_sdpo_batch",
    "build_teacher_batch",
    "build_teacher_messages",
    "build_teacher_prompt_ids",
    "load_checkpoint",
    "pad_sequences",
    "save_checkpoint",
    "select_demonstrations",
    "sequence_rewards",
    "sdpo_step",
    "split_completions",
    "split_scores_and_feedback",
    "strip_thinking",
]

"""Drop-in replacement for ``trl.experimental.sdft.SDFTTrainer`` whose loss runs on :func:`sdpo_ops.sdpo_loss`.

Change one import::

    from sdpo_ops.adapters.trl import SDFTConfig, SDFTTrainer  # was: from trl.experimental.sdft import ...

SDFT (Self-Distillation Fine-Tuning, arXiv 2601.19897) distils the model, prompted with a demonstration (the dataset's
``privileged_context`` column), into itself without it, on its own rollouts. TRL's trainer computes the same loss as
its SDPO trainer (``loss_utils.py`` is shared) from full ``[B, T, V]`` student and teacher logits; here it runs on the
fused path shared with ``sdpo_ops.adapters.trl.SDPOTrainer`` (:mod:`sdpo_ops.adapters.trl_fused`): the local teacher
(``distillation_mode`` ``"topk_logits"``, ``"full_logits"``, ``"sampled_token"``) on :func:`sdpo_ops.sdpo_loss`, the
served one (``use_teacher_server=True``) on :func:`sdpo_ops.sdpo_loss_from_teacher_topk`. Everything else is TRL's:
rollouts, teacher prompts (``teacher_prompt_template``, ``generate_from_teacher``), ``num_loss_tokens_to_skip``, the
base/EMA/live teacher, vLLM, PEFT, callbacks, metrics.

Where it differs from TRL's trainer: the EMA teacher is saved in checkpoints and restored on resume (TRL rebuilds it
from the base model), the LoRA EMA teacher works under FSDP2, and what TRL accepts but fails on after a rollout is
refused in ``__init__``: besides the distillation fields, a negative or non-integer ``num_loss_tokens_to_skip``, and a
dataset without the ``privileged_context`` column the teacher prompt is built from.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from trl.experimental.sdft import SDFTConfig
from trl.experimental.sdft.sdft_trainer import SDFTTrainer as _TRLSDFTTrainer
from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback

from sdpo_ops.adapters.trl_fused import FusedDistillationMixin

__all__ = ["SDFTConfig", "SDFTTrainer"]

_DEMONSTRATION_COLUMN = "privileged_context"


class SDFTTrainer(FusedDistillationMixin, _TRLSDFTTrainer):
    """``trl.experimental.sdft.SDFTTrainer`` with the loss fused into the lm_head by :func:`sdpo_ops.sdpo_loss`.

    Same constructor and :class:`SDFTConfig` as TRL's; see the module docstring for what differs.
    """

    _trl_trainer = _TRLSDFTTrainer
    _trl_lora_ema_callback = PEFTAdapterEMACallback

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    # Same parameters as TRL's constructor, for help() and IDEs (the body forwards them untouched).
    __init__.__signature__ = inspect.signature(_TRLSDFTTrainer.__init__)

    def _validate_trainer_arguments(self, arguments: dict[str, Any]) -> None:
        config = arguments.get("args")
        if config is not None:
            skip = config.num_loss_tokens_to_skip
            # TRL silently reads a negative count as 0 (nothing skipped), a fractional one as its ceiling.
            if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
                raise ValueError(f"num_loss_tokens_to_skip must be an int >= 0, got {skip!r}")
        datasets = {"train_dataset": arguments.get("train_dataset")}
        eval_dataset = arguments.get("eval_dataset")
        if isinstance(eval_dataset, dict):
            datasets.update({f"eval_dataset[{name!r}]": value for name, value in eval_dataset.items()})
        else:
            datasets["eval_dataset"] = eval_dataset
        for name, dataset in datasets.items():
            columns = getattr(dataset, "column_names", None)
            # TRL builds every teacher prompt from this column, and fails only once a rollout is generated.
            if columns is not None and _DEMONSTRATION_COLUMN not in columns:
                raise ValueError(
                    f"{name} has no {_DEMONSTRATION_COLUMN!r} column (it has {columns}): SDFT's teacher sees the "
                    "prompt with its demonstration (teacher_prompt_template's {privileged_context})"
                )

    def _distillation_mask(self, inputs: dict[str, Any]) -> Tensor:
        """TRL's SDFT ``loss_mask``: the completion tokens after the first ``num_loss_tokens_to_skip``."""
        completion_mask = inputs["completion_mask"]
        positions = torch.arange(completion_mask.size(1), device=completion_mask.device).unsqueeze(0)
        return completion_mask.float() * (positions >= self.num_loss_tokens_to_skip)

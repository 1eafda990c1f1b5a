"""sdpo_ops: the SDPO self-distillation loss fused with the lm_head, without [N, V] logits."""

from sdpo_ops import presets
from sdpo_ops.loss import SDPOLoss, SDPOOutput, sdpo_loss, sdpo_loss_from_logits
from sdpo_ops.teacher_topk import sdpo_loss_from_teacher_topk, validate_teacher_topk

__version__ = "0.1.0"

__all__ = [
    "SDPOLoss",
    "SDPOOutput",
    "__version__",
    "presets",
    "sdpo_loss",
    "sdpo_loss_from_logits",
    "sdpo_loss_from_teacher_topk",
    "validate_teacher_topk",
]

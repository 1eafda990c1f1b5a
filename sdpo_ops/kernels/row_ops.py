"""The row stages of a chunk as Triton launchers: a drop-in for ``sdpo_ops.row_ops``.

``from sdpo_ops.kernels import row_ops`` gives the same functions, same positional signatures and
semantics, as the torch twins, so the chunked autograd Function takes either namespace. Each streaming
launcher also takes a keyword-only ``block_v`` (tile width) for tests and tuning.
"""

from sdpo_ops.kernels.full_vocab_divergence import full_vocab_divergence
from sdpo_ops.kernels.logit_grad import logit_grad
from sdpo_ops.kernels.row_loss import row_loss_
from sdpo_ops.kernels.student_row_stats import student_row_stats
from sdpo_ops.kernels.teacher_row_stats import teacher_row_stats

__all__ = ["full_vocab_divergence", "logit_grad", "row_loss_", "student_row_stats", "teacher_row_stats"]

"""Triton kernels of sdpo_ops (design A of KERNELS.md: a cuBLAS chunk + fused Triton row kernels).

The host code (``sdpo_ops.chunked``) forms one chunk of logits ``[C, V]`` fp32 (divided by the
temperature) with a torch matmul, then runs its row stages, one program per row, each a Triton kernel
with its launcher in a file of its own:

- ``student_row_stats.py``: online log-sum-exp, sub-block maxima and the target logit in one pass over
  the student row, then the exact top-K (values and int64 indices) by a bitonic top-k network on packed
  int64 keys over the K sub-blocks with the largest maxima only; with a teacher given as logits, the teacher's
  log-sum-exp in the same pass (its row streamed beside the student's) and its logits at the top-K and target;
- ``teacher_row_stats.py``: a log-sum-exp and the logits at given columns, alone (a top-K-log-prob teacher's stage
  over the student's buffer, at the teacher's ids);
- ``full_vocab_divergence.py``: the full-vocabulary GJSD per row and the row sum of its gradient;
- ``logit_grad.py``: the gradient w.r.t. the student logits, in place (dense kernel + torch scatter_add_).

``row_ops.py`` gathers the launchers into a namespace that is a drop-in for ``sdpo_ops.row_ops``
(the torch twins). Nothing is imported here, so importing ``sdpo_ops.kernels`` never compiles Triton code;
under ``TRITON_INTERPRET=1`` (set before the first import) the same kernels run on CPU tensors.
"""

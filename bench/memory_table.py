"""When the fused loss's memory saving matters: the loss alone against tokens x vocabulary, and a whole training step.

Everything is priced on ``meta`` tensors with ``bench.trace`` (the real host code and every allocation at full size,
nothing computed), so it needs no GPU and takes seconds:

1. **The loss alone**: the peak bytes one ``sdpo_loss`` call (forward + backward, bf16 inputs, top-100, the Triton
   path GPUs run) allocates beyond its inputs, against the same loss on materialised logits (``backend="reference"``:
   student and teacher ``[N, V]`` logits, their log-softmax, TRL's math), over completion tokens N and vocabulary V.
2. **A whole training step** at real model sizes: an SDPO step's peak on one GPU, with the student's weights,
   gradients and AdamW states, an EMA teacher copy, the teacher's no-grad forward, the student's forward and
   backward, and the loss: ours (backbones + ``sdpo_loss``) against the materialised path (the models' ``[B, T, V]``
   logits + the same loss on them, as TRL's trainer runs it). Assumptions: the model loaded in bf16 (so gradients
   and AdamW's states are bf16 too), flash attention, no gradient checkpointing, no sharding.

    python -m bench.memory_table            # writes bench/results/memory/memory.md and memory.png
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.trace import trace
from sdpo_ops import sdpo_loss, sdpo_loss_from_logits

GiB = 2**30
TOPK = 100
LOSS_HIDDEN_SIZE = 4096
LOSS_TOKENS = (1024, 4096, 16384, 65536)
LOSS_VOCABS = (32768, 151936, 262144)
OUTPUT = Path(__file__).resolve().parent / "results" / "memory"


def _meta(*shape, dtype=torch.bfloat16, grad=False) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def loss_peak_bytes(tokens: int, vocab: int, hidden_size: int, *, fused: bool) -> int:
    """Peak extra bytes of one loss call, forward + backward, bf16 inputs (the inputs exist before the trace)."""
    hidden, weight = _meta(tokens, hidden_size, grad=True), _meta(vocab, hidden_size, grad=True)
    teacher_hidden, teacher_weight = _meta(tokens, hidden_size), _meta(vocab, hidden_size)
    target_ids, old_logprobs = _meta(tokens, dtype=torch.int64), _meta(tokens, dtype=torch.float32)
    backend = "triton" if fused else "reference"
    return trace(
        lambda: sdpo_loss(
            hidden,
            weight,
            teacher_hidden,
            teacher_weight,
            target_ids=target_ids,
            old_logprobs=old_logprobs,
            topk=TOPK,
            backend=backend,
        )  # fmt: skip
    ).peak_bytes()


# ------------------------------------------------------------------------------------------ a whole training step


@dataclass(frozen=True)
class ModelSize:
    """A real model's shape (from its published config.json), built on ``meta`` from its transformers config."""

    name: str
    model_type: str
    config: dict


MODEL_SIZES = (
    ModelSize("SmolLM2-135M", "llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    ModelSize("Qwen2.5-0.5B", "qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    ModelSize("Qwen2.5-1.5B", "qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    ModelSize("Qwen2.5-7B", "qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
)  # fmt: skip
STEP_BATCH, STEP_PROMPT, STEP_COMPLETION = 8, 512, 1024


def _flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention through aten's flash-attention op, whose meta kernel saves only the output and the
    log-sum-exp for backward, as on a GPU (the math fallback would price a [B, heads, L, L] score matrix)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    output = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, scale=scaling)[0]
    return output.transpose(1, 2).contiguous(), None


def _meta_model(size: ModelSize):
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

    AttentionInterface.register("meta_priced_attention", _flash_attention)
    config = AutoConfig.for_model(size.model_type, **size.config, attn_implementation="meta_priced_attention")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def step_peak_bytes(size: ModelSize, *, fused: bool) -> dict[str, int]:
    """``{"static", "step", "total"}`` bytes of one SDPO training step of ``size`` (see the module docstring)."""
    student, teacher = _meta_model(size), _meta_model(size)
    parameter_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    static = 4 * parameter_bytes  # the student's weights, AdamW's two states, the EMA teacher copy (all bf16)
    length = STEP_PROMPT + STEP_COMPLETION
    input_ids = torch.zeros(STEP_BATCH, length, dtype=torch.int64, device="meta")
    completion_ids = input_ids[:, -STEP_COMPLETION:]

    def forward():
        with torch.no_grad():
            teacher_out = teacher.model(input_ids=input_ids).last_hidden_state[:, -STEP_COMPLETION - 1 : -1]
            if not fused:
                teacher_out = teacher.lm_head(teacher_out)  # the teacher's [B, T, V] logits
        hidden = student.model(input_ids=input_ids).last_hidden_state[:, -STEP_COMPLETION - 1 : -1]
        if fused:
            return sdpo_loss(hidden, student.lm_head.weight, teacher_out, teacher.lm_head.weight,
                             target_ids=completion_ids, topk=TOPK, is_clip=None, backend="triton")  # fmt: skip
        logits = student.lm_head(hidden)  # the student's [B, T, V] logits, as model(...).logits
        return sdpo_loss_from_logits(logits, teacher_out, target_ids=completion_ids, topk=TOPK, is_clip=None)

    traced = trace(forward)
    return {"static": static, "step": traced.peak_bytes(), "total": static + traced.peak_bytes()}


# ---------------------------------------------------------------------------------------------------- the report


def _gib(value: int) -> str:
    return f"{value / GiB:.2f}"


def loss_table() -> tuple[str, list[dict]]:
    rows = []
    for vocab in LOSS_VOCABS:
        for tokens in LOSS_TOKENS:
            fused = loss_peak_bytes(tokens, vocab, LOSS_HIDDEN_SIZE, fused=True)
            naive = loss_peak_bytes(tokens, vocab, LOSS_HIDDEN_SIZE, fused=False)
            rows.append({"tokens": tokens, "vocab": vocab, "fused": fused, "materialised": naive})
    lines = [
        "| N (tokens) | V | N x V | fused (GiB) | materialised (GiB) | fused / materialised |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tokens']} | {row['vocab']} | {row['tokens'] * row['vocab']:.1e} | {_gib(row['fused'])} | "
            f"{_gib(row['materialised'])} | {row['fused'] / row['materialised']:.2f}x |"
        )
    return "\n".join(lines), rows


def step_table() -> str:
    lines = [
        "| model | V | weights + AdamW + EMA teacher (GiB) | step, fused (GiB) | step, materialised (GiB) | "
        "peak, fused (GiB) | peak, materialised (GiB) | saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in MODEL_SIZES:
        fused, naive = step_peak_bytes(size, fused=True), step_peak_bytes(size, fused=False)
        lines.append(
            f"| {size.name} | {size.config['vocab_size']} | {_gib(fused['static'])} | {_gib(fused['step'])} | "
            f"{_gib(naive['step'])} | {_gib(fused['total'])} | {_gib(naive['total'])} | "
            f"{1 - fused['total'] / naive['total']:.0%} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for vocab, marker in zip(LOSS_VOCABS, "os^", strict=True):
        points = [row for row in rows if row["vocab"] == vocab]
        x = [row["tokens"] * row["vocab"] for row in points]
        axis.loglog(x, [row["materialised"] / GiB for row in points], f"--{marker}", color="tab:red",
                    label=f"materialised, V={vocab}")  # fmt: skip
        axis.loglog(x, [row["fused"] / GiB for row in points], f"-{marker}", color="tab:blue",
                    label=f"sdpo_loss, V={vocab}")  # fmt: skip
    axis.set_xlabel("completion tokens x vocabulary (N x V)")
    axis.set_ylabel("loss's extra memory, forward + backward (GiB)")
    axis.set_title(f"Extra memory of the loss (bf16, H={LOSS_HIDDEN_SIZE}, top-{TOPK}; meta trace)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    loss_markdown, rows = loss_table()
    report = [
        "# Memory: the loss alone, and a whole SDPO training step",
        "",
        "Generated by `python -m bench.memory_table` (meta-device trace, `bench/trace.py`; no GPU needed, exact byte",
        "counts of the host code's allocations, priced as the CUDA path would allocate them).",
        "",
        f"## The loss alone (forward + backward, bf16, H={LOSS_HIDDEN_SIZE}, top-{TOPK}, peak beyond the inputs)",
        "",
        loss_markdown,
        "",
        f"## One training step on one GPU ({STEP_BATCH} sequences of {STEP_PROMPT} prompt + {STEP_COMPLETION} "
        "completion tokens)",
        "",
        "bf16 model, AdamW (states in bf16, the parameters' dtype), an EMA teacher copy, flash attention, no",
        "gradient checkpointing, no sharding. *step*: the peak the step allocates beyond the weights and optimizer",
        "states (both backbones' activations, the loss, the gradients); *peak* adds them.",
        "",
        step_table(),
        "",
    ]
    (args.output_dir / "memory.md").write_text("\n".join(report))
    plot(rows, args.output_dir / "memory.png")
    print("\n".join(report))


if __name__ == "__main__":
    main()

"""On-policy distillation from a larger teacher that lives outside the training process (vLLM, SGLang, a cache).

Each step the student samples completions; the teacher scores them and returns, per completion token, its own
top-K log-probs and token ids (what ``trl``'s ``VLLMClient.get_sequence_logprobs`` returns from a vLLM server);
the student is pulled toward them with ``sdpo_loss_from_teacher_topk``, from its hidden states and lm_head weight,
never forming its ``[B, T, V]`` logits. Here a second, larger local model stands in for the server, behind one
function (:func:`served_teacher_logprobs`) that a vLLM client call replaces:

    from trl.generation.vllm_client import VLLMClient
    client = VLLMClient(base_url="http://teacher-host:8000")
    served = client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=K, temperature=1.0)

The student is a tiny random Qwen2 (hidden 32, 2 layers) and the teacher a larger one (hidden 64, 4 layers) with
the same character-level tokenizer, so the script runs on a CPU in seconds. At the end it prints the memory the
loss held beyond its inputs, measured by the repository's allocation tracer (``bench.trace``, run from a checkout)
for this run's last batch and, on ``meta`` tensors, for a batch of TRL's size at Qwen's vocabulary, against
the materialising path (``backend="reference"``: the student's full logits and log-softmax, TRL's math).

    python examples/distill_from_served_teacher.py --steps 8
    python examples/distill_from_served_teacher.py --steps 2 --output result.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from sdpo_ops import sdpo_loss_from_teacher_topk
from sdpo_ops.adapters import backbone_and_head, completion_hidden_states, pad_sequences, split_completions

EXAMPLES = Path(__file__).resolve().parent
sys.path[:0] = [str(EXAMPLES), str(EXAMPLES.parent)]  # the sibling example's tiny model; bench.trace (a checkout)
from train_plain_pytorch import LETTERS, tiny_model_and_tokenizer  # noqa: E402

from bench.trace import trace  # noqa: E402

MiB = 2**20


def larger_teacher(student, seed: int):
    """A Qwen2 twice the student's width and depth, same vocabulary: the model a server would host."""
    from transformers import Qwen2ForCausalLM

    config = student.config.to_dict()
    config.pop("layer_types", None)  # derived from the depth
    config = student.config.__class__(**{**config, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4})
    torch.manual_seed(seed + 1)
    teacher = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # a peaked teacher: something definite to distil
    return teacher


@torch.no_grad()
def served_teacher_logprobs(teacher, sequences: list[list[int]], prompt_lengths: list[int], top_logprobs: int,
                            temperature: float = 1.0) -> dict[str, list]:  # fmt: skip
    """The teacher's top-K log-probs of each completion token, in ``VLLMClient.get_sequence_logprobs``'s format.

    Returns ``logprobs`` and ``logprob_token_ids``, each ``[batch][completion_len][top_logprobs]`` (nested lists,
    sorted by probability). Replace the body with the client call in the module docstring to use a real server.
    """
    ids, attention = pad_sequences(sequences, padding_value=0, side="right")
    logprobs = torch.log_softmax(teacher(input_ids=ids, attention_mask=attention).logits / temperature, dim=-1)
    top = logprobs.topk(top_logprobs, dim=-1)
    result = {"logprobs": [], "logprob_token_ids": []}
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        # the logits at position p predict token p + 1
        positions = slice(prompt_length - 1, len(sequence) - 1)
        result["logprobs"].append(top.values[row, positions].tolist())
        result["logprob_token_ids"].append(top.indices[row, positions].tolist())
    return result


def as_padded_tensors(served: dict[str, list], completion_width: int, top_logprobs: int):
    """``[B, T, K]`` tensors as TRL builds them from a server reply: positions past a completion's end keep the
    ``-inf`` / id-0 padding, which the loss never reads (they are masked)."""
    batch = len(served["logprobs"])
    logprobs = torch.full((batch, completion_width, top_logprobs), -math.inf)
    ids = torch.zeros((batch, completion_width, top_logprobs), dtype=torch.long)
    for row, (values, indices) in enumerate(zip(served["logprobs"], served["logprob_token_ids"], strict=True)):
        if values:
            logprobs[row, : len(values)] = torch.tensor(values)
            ids[row, : len(indices)] = torch.tensor(indices)
    return logprobs, ids


def peak_extra_mib(loss_fn) -> float:
    """Peak bytes allocated beyond the inputs during forward + backward (``bench.trace``), in MiB."""
    traced = trace(loss_fn)
    return max(traced.peak_extra_bytes.values()) / MiB


def memory_report(student_hidden, student_weight, student_bias, teacher_logprobs, teacher_ids, mask, targets):
    """Extra memory of the fused loss against the materialising path, for one batch (any device, meta included)."""

    def loss_fn(backend):
        def run():
            return sdpo_loss_from_teacher_topk(
                student_hidden, student_weight, teacher_logprobs, teacher_ids, student_bias=student_bias, mask=mask,
                target_ids=targets, is_clip=None, reduction="seq-mean-token-mean", backend=backend,
            )  # fmt: skip

        return run

    return {backend: peak_extra_mib(loss_fn(backend)) for backend in ("torch", "reference")}


def at_scale_report(top_logprobs: int) -> dict[str, float]:
    """The same measurement on ``meta`` tensors (nothing computed) for 16 completions of 512 tokens, H=896,
    V=151936 (Qwen2.5-0.5B's head), bf16: what one step of a real run holds."""
    batch, steps, hidden_size, vocab = 16, 512, 896, 151936

    def empty(*shape, dtype=torch.bfloat16, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    return memory_report(
        empty(batch, steps, hidden_size, grad=True), empty(vocab, hidden_size, grad=True), None,
        empty(batch, steps, top_logprobs, dtype=torch.float32), empty(batch, steps, top_logprobs, dtype=torch.int64),
        empty(batch, steps, dtype=torch.float32), empty(batch, steps, dtype=torch.int64),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="generation batches (one optimizer step each)")
    parser.add_argument("--batch", type=int, default=16, help="completions per step")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--topk", type=int, default=8, help="top-K log-probs the teacher returns per token")
    parser.add_argument("--alpha", type=float, default=0.0, help="0: forward KL (teacher || student), 1: reverse")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write losses and memory figures to this JSON file")
    args = parser.parse_args()

    start = time.perf_counter()
    random.seed(args.seed)
    student, tokenizer = tiny_model_and_tokenizer(args.seed)
    teacher = larger_teacher(student, args.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    backbone, head_weight, head_bias = backbone_and_head(student)

    losses, masses = [], []
    for step in range(1, args.steps + 1):
        # 1. The student samples (on-policy: one optimizer step per batch, so no importance weights).
        prompts = [
            [{"role": "user", "content": f"Use the letter {random.choice(LETTERS)}."}] for _ in range(args.batch)
        ]
        prompt_ids = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in prompts
        ]
        input_ids, attention_mask = pad_sequences(prompt_ids, padding_value=tokenizer.pad_token_id, side="left")
        student.eval()
        with torch.no_grad():
            generated = student.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0, top_p=1.0,
                max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        completions = split_completions(generated, input_ids.shape[1], tokenizer.eos_token_id)

        # 2. The teacher scores them outside the training process: top-K log-probs per completion token.
        sequences = [list(p) + c for p, c in zip(prompt_ids, completions, strict=True)]
        served = served_teacher_logprobs(teacher, sequences, [len(p) for p in prompt_ids], args.topk)
        completion_ids, completion_mask = pad_sequences(completions, padding_value=tokenizer.pad_token_id, side="right")
        teacher_logprobs, teacher_ids = as_padded_tensors(served, completion_ids.shape[1], args.topk)

        # 3. Distil from the student's hidden states and lm_head: no [B, T, V] logits.
        student.train()
        hidden = completion_hidden_states(
            backbone, torch.cat([input_ids, completion_ids], 1), torch.cat([attention_mask, completion_mask], 1),
            completion_ids.shape[1],
        )  # fmt: skip
        out = sdpo_loss_from_teacher_topk(
            hidden, head_weight, teacher_logprobs, teacher_ids, student_bias=head_bias, mask=completion_mask,
            target_ids=completion_ids, alpha=args.alpha, is_clip=None, reduction="seq-mean-token-mean",
            return_outputs=True,
        )  # fmt: skip
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        masses.append(out.metrics["topk_mass_mean"].item())
        print(f"step {step}: loss {losses[-1]:.6f}  student mass on the teacher's top-{args.topk} {masses[-1]:.3f}")

    # 4. What the loss held: this run's last batch, and one step of a real run (meta tensors).
    with torch.no_grad():
        hidden = completion_hidden_states(
            backbone, torch.cat([input_ids, completion_ids], 1), torch.cat([attention_mask, completion_mask], 1),
            completion_ids.shape[1],
        )  # fmt: skip
    hidden.requires_grad_()
    this_run = memory_report(
        hidden, head_weight, head_bias, teacher_logprobs, teacher_ids, completion_mask, completion_ids
    )
    at_scale = at_scale_report(args.topk)
    vocab = head_weight.shape[0]
    labels = (f"this run's last batch (V={vocab})", "one step of 16 x 512 tokens at V=151936, H=896, bf16 (meta)")
    for label, figures in zip(labels, (this_run, at_scale), strict=True):
        print(
            f"extra memory of the loss, {label}: fused {figures['torch']:.2f} MiB, materialised student logits "
            f"{figures['reference']:.2f} MiB: saves {figures['reference'] - figures['torch']:.2f} MiB "
            f"({figures['reference'] / figures['torch']:.1f}x less)"
        )
    summary = {
        "losses": losses,
        "topk_mass": masses,
        "memory_mib": {"this_run": this_run, "at_scale": at_scale},
        "seconds": time.perf_counter() - start,
    }
    print(f"done in {summary['seconds']:.1f} s")
    if args.output is not None:
        Path(args.output).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""One SDPO training step end to end: TRL's ``SDPOTrainer`` against ours, same tiny model, same batch.

The batch (rollouts, rewards, teacher reprompts, rollout log-probs) is built once by TRL's trainer and
handed to both, so the two steps differ only in the loss path. The timed step is the loss forward+backward
(student and teacher model forwards included, generation excluded: it is the same code in both):
``trainer.compute_loss(model, batch).backward()``.

The model: a 2-layer Qwen2 (hidden 64) with a 32768-token vocabulary (a character-level tokenizer padded
with filler tokens), so that the lm_head and the ``[B, T, V]`` logits dominate as they do at scale.
Config: ``distillation_mode="topk_logits"``, K=100, tail bucket, alpha 0.5, IS clip 2 (``num_iterations=2``
makes TRL compute the rollout log-probs the IS correction needs).

``python -m bench.e2e '<json>'`` (``{"trainer": "trl"|"sdpo_ops", "workdir": ...}``) measures the peak RSS
of one step in a fresh process, after a warm-up step; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import string
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

VOCAB_SIZE = 32768
HIDDEN_SIZE = 64
TOPK = 100
NUM_GENERATIONS = 4
BATCH_SIZE = 8  # two prompts x four generations
MAX_COMPLETION_LENGTH = 48
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHARACTERS = string.ascii_letters + string.digits + " \n.,:;!?'-+=()"
PROMPTS = ["Add 12 and 30. Answer:", "Spell the word cat backwards:"]

TRAINERS = {"trl": "trl_sdpo_trainer", "sdpo_ops": "sdpo_ops_trainer"}


def adapter_missing() -> str | None:
    try:
        from sdpo_ops.adapters.trl import SDPOTrainer  # noqa: F401
    except ImportError as err:
        return f"sdpo_ops.adapters.trl.SDPOTrainer does not import yet ({err})"
    return None


def build_model_dir(directory: Path) -> Path:
    """Save the tiny model and its tokenizer to ``directory`` (TRL builds the EMA teacher from a path)."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if (directory / "config.json").is_file():
        return directory
    tokens = SPECIAL_TOKENS + list(CHARACTERS)
    tokens += [f"<f{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a peaked next-token distribution, as a trained model has
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _reward(prompts, completions, **kwargs) -> list[float]:
    # Half of each group succeeds, so every sample has a sibling demonstration and a teacher signal.
    return [float(i % 2 == 0) for i in range(len(completions))]


def make_trainer(kind: str, model_dir: Path, output_dir: Path):
    """TRL's ``SDPOTrainer`` (``kind="trl"``) or ours (``"sdpo_ops"``) on the tiny model, CPU, fp32."""
    from datasets import Dataset

    if kind == "trl":
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer
    elif kind == "sdpo_ops":
        from sdpo_ops.adapters.trl import SDPOConfig, SDPOTrainer
    else:
        raise ValueError(f"unknown trainer {kind!r}")
    args = SDPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=BATCH_SIZE,
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH,
        num_iterations=2,
        distillation_mode="topk_logits",
        distillation_topk=TOPK,
        distillation_add_tail=True,
        distillation_alpha=0.5,
        distillation_is_clip=2.0,
        distillation_weight=1.0,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_steps=1,
        seed=0,
    )
    dataset = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SDPOTrainer(model=str(model_dir), reward_funcs=[_reward], args=args, train_dataset=dataset)
    trainer.model.train()
    # Set by Trainer's training loop, read by compute_loss; the benchmark calls compute_loss directly.
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def prepare_batch(trainer) -> dict:
    """Rollouts, rewards, teacher reprompts and rollout log-probs for the generation batch (seeded)."""
    import torch

    torch.manual_seed(0)
    rows = [{"prompt": p} for p in PROMPTS for _ in range(NUM_GENERATIONS)]
    return trainer._prepare_training_batch(rows)


def loss_step(trainer, batch):
    """One loss forward+backward of ``trainer`` on ``batch``, gradients reset first."""

    def step():
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return loss

    return step


def batch_tokens(batch) -> int:
    return int(batch["completion_mask"].sum())


def probe(spec: dict) -> dict:
    """Peak RSS of one step beyond the RSS before it, after a warm-up step (run in a fresh process)."""
    import torch

    from bench.memprobe import _peak_rss_bytes, _reset_peak_rss, _rss_bytes, _trim_heap

    workdir = Path(spec["workdir"])
    trainer = make_trainer(spec["trainer"], workdir / "model", workdir / f"out-{spec['trainer']}")
    batch = torch.load(workdir / "batch.pt", weights_only=False)
    step = loss_step(trainer, batch)
    step()  # warm-up: lazy initialisations
    trainer.model.zero_grad(set_to_none=True)
    _trim_heap()
    exact = _reset_peak_rss()
    baseline = _rss_bytes()
    loss = step()
    peak = _peak_rss_bytes()
    return {
        "trainer": spec["trainer"],
        "loss": float(loss),
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "extra_bytes": max(0, peak - baseline),
        "peak_reset_exact": exact,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(probe(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SDPO in a hand-written PyTorch loop: sample, reward, reprompt, distil, step, average the teacher.

The toy task: "Use the letter x." A completion earns reward 1 if it contains the letter. Failed attempts
get textual feedback from the reward function; successful siblings become demonstrations in the
teacher's prompt. By default the model is a tiny random Qwen2 with a character-level tokenizer, so the
script runs on a CPU in seconds; ``--model DIR`` trains a saved causal LM instead.

    python examples/train_plain_pytorch.py --steps 8
    python examples/train_plain_pytorch.py --steps 2 --output result.json
    python examples/train_plain_pytorch.py --steps 4 --checkpoint run/ckpt.pt           # saved after every step
    python examples/train_plain_pytorch.py --steps 8 --checkpoint run/ckpt.pt --resume  # continues at step 5

A resumed run ends exactly as an uninterrupted one (student, EMA teacher, optimizer, RNG and the logged
history all come back from the checkpoint); a run killed while saving keeps the previous checkpoint.

One optimizer step per batch of rollouts keeps training on-policy, so no ``old_logprobs`` (importance
weights) are needed; with several steps per batch, pass the rollout log-probs to ``build_sdpo_batch``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import time

import torch

from sdpo_ops.adapters import (
    EMATeacher,
    RewardWithFeedback,
    build_sdpo_batch,
    build_teacher_batch,
    load_checkpoint,
    pad_sequences,
    save_checkpoint,
    sdpo_step,
    split_completions,
    split_scores_and_feedback,
)

LETTERS = "abcdefgh"


def tiny_model_and_tokenizer(seed: int):
    """A 2-layer Qwen2 (hidden 32) and a one-token-per-character chat tokenizer, built in memory."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    characters = string.ascii_letters + string.digits + " \n.,:;!?'-"
    vocab = {token: index for index, token in enumerate(specials + list(characters))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # a random init this small is near-uniform; spread it out a little
    return model, tokenizer


def letter_reward(prompts, completions, letters) -> RewardWithFeedback:
    """1 if the completion contains the requested letter, else 0 and feedback saying so."""
    scores, feedback = [], []
    for completion, letter in zip(completions, letters, strict=True):
        success = letter in completion
        scores.append(1.0 if success else 0.0)
        feedback.append(None if success else f"Your answer never uses the letter {letter}.")
    return RewardWithFeedback(scores, feedback)


def parameter_distance(model, snapshot) -> float:
    return math.sqrt(sum((p.detach().float() - snapshot[n]).pow(2).sum().item() for n, p in model.named_parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="generation batches (one optimizer step each)")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--topk", type=int, default=20, help="top-K support of the distillation loss")
    parser.add_argument("--update-rate", type=float, default=0.05, help="EMA rate of the teacher")
    parser.add_argument("--sync-on", choices=["optimizer_step", "generation_batch"], default="generation_batch")
    parser.add_argument("--model", default=None, help="directory of a saved causal LM + tokenizer (default: tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write losses and weight changes to this JSON file")
    parser.add_argument("--checkpoint", default=None, help="save the training state here after every step")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint (if it exists)")
    args = parser.parse_args()
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint PATH")

    start = time.perf_counter()
    random.seed(args.seed)
    if args.model is None:
        model, tokenizer = tiny_model_and_tokenizer(args.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.to(args.device)
    initial = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    teacher = EMATeacher(model, update_rate=args.update_rate, sync_on=args.sync_on)
    initial_teacher = {name: p.detach().float().clone() for name, p in teacher.model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    losses, mean_rewards = [], []
    completed_steps = 0
    if args.resume and os.path.exists(args.checkpoint):
        restored = load_checkpoint(args.checkpoint, model=model, teacher=teacher, optimizer=optimizer)
        completed_steps, losses, mean_rewards = restored.step, restored.extra["losses"], restored.extra["mean_rewards"]
        print(f"resumed from {args.checkpoint} after step {completed_steps}", flush=True)
    for step in range(completed_steps + 1, args.steps + 1):
        # 1. Rollouts: each prompt repeated group_size times, consecutive (the group layout).
        letters = [random.choice(LETTERS) for _ in range(args.prompts_per_step)]
        letters = [letter for letter in letters for _ in range(args.group_size)]
        prompts = [[{"role": "user", "content": f"Use the letter {letter}."}] for letter in letters]
        prompt_ids = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in prompts
        ]
        input_ids, attention_mask = pad_sequences(
            prompt_ids, padding_value=tokenizer.pad_token_id, side="left", device=args.device
        )
        model.eval()
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        completions = split_completions(generated, input_ids.shape[1], tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)

        # 2. Rewards with feedback, then the teacher's reprompted inputs.
        rewards, feedback = split_scores_and_feedback(letter_reward(prompts, texts, letters))
        teacher_batch = build_teacher_batch(
            tokenizer, prompts, completions, rewards, args.group_size, feedback=feedback, device=args.device
        )
        batch = build_sdpo_batch(prompt_ids, teacher_batch, pad_token_id=tokenizer.pad_token_id)

        # 3. Distil and step; the teacher follows on the schedule chosen by --sync-on.
        model.train()
        result = sdpo_step(model, teacher, batch, topk=args.topk)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        teacher.on_optimizer_step(model)
        teacher.on_generation_batch_end(model)

        loss = result.loss.item()
        losses.append(loss)
        mean_rewards.append(sum(rewards) / len(rewards))
        print(
            f"step {step}: loss {loss:.6f}  reward {mean_rewards[-1]:.3f}  "
            f"reprompted {teacher_batch.metrics['self_distillation/reprompt_sample_fraction']:.2f}  "
            f"top-K mass {result.metrics['topk_mass_mean'].item():.3f}",
            flush=True,
        )
        if args.checkpoint is not None:
            history = {"losses": losses, "mean_rewards": mean_rewards}
            save_checkpoint(
                args.checkpoint, model=model, teacher=teacher, optimizer=optimizer, step=step, extra=history
            )

    summary = {
        "losses": losses,
        "mean_rewards": mean_rewards,
        "student_change": parameter_distance(model, initial),
        "teacher_change": parameter_distance(teacher.model, initial_teacher),
        "seconds": time.perf_counter() - start,
    }
    print(
        f"student moved {summary['student_change']:.4f}, teacher {summary['teacher_change']:.4f} "
        f"(L2), in {summary['seconds']:.1f} s"
    )
    if args.output is not None:
        with open(args.output, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()

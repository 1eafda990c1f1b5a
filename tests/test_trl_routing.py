"""``SDPOConfig(sample_routing=True)``: the TRL adapter's routed loss on a real rollout batch against an oracle
built from the models' full logits (the naive reference divergence on the distilled samples, the clipped policy
loss on log_softmax elsewhere), and the configs it refuses."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from adapters_tiny import PROMPTS, chat_dataset, make_model, make_tokenizer, save_model, tiny_sdpo_config  # noqa: E402
from transformers import set_seed  # noqa: E402

from sdpo_ops.adapters.trl import SDPOTrainer  # noqa: E402
from sdpo_ops.reference import sdpo_loss_reference_from_logits  # noqa: E402

# Per group of 4: two successes and two failures (distilled from a sibling's demonstration), then no success
# at all, with feedback for the first failure only (distilled) and none for the others (the policy fallback).
SCORES = ((1.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0))
FEEDBACK = ((None, None, None, None), ("Wrong: try again.", None, None, None))


def _reward(completion_ids, **kwargs):
    count = len(completion_ids)
    return [{"score": SCORES[i // 4][i % 4], "feedback": FEEDBACK[i // 4][i % 4]} for i in range(count)]


_reward.__name__ = "scheduled"


def _logits(model, input_ids, attention_mask, width):
    # TRL's convention: the model's default position ids (TRL's _forward_logits passes none).
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, -width - 1 : -1]


def test_routed_loss_matches_oracle(tmp_path):
    tokenizer = make_tokenizer()
    model_dir = save_model(tmp_path / "model", tokenizer, make_model(len(tokenizer)))
    args = tiny_sdpo_config(
        tmp_path / "out",
        sample_routing=True,
        distillation_mode="topk_logits",
        distillation_topk=5,
        include_environment_feedback=True,
        success_reward_threshold=0.5,
        teacher_model_kind="base",
        temperature=0.8,
        per_device_train_batch_size=8,
    )
    trainer = SDPOTrainer(
        model=model_dir, reward_funcs=_reward, args=args, train_dataset=chat_dataset(), processing_class=tokenizer
    )
    # The frozen base teacher made to differ from the student, as after some training.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for param in trainer.model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    set_seed(0)
    trainer.model.eval()  # no gradient-accumulation scaling outside the training loop
    rows = [{"prompt": [{"role": "user", "content": text}]} for text in PROMPTS[:2] for _ in range(4)]
    inputs = trainer._prepare_training_batch(rows)
    assert inputs["self_distillation_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    route = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])

    loss = trainer.compute_loss(trainer.model, inputs)
    trainer.model.zero_grad()
    loss.backward()
    got = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}

    trainer.model.zero_grad()
    width = inputs["completion_ids"].shape[1]
    completion_mask = inputs["completion_mask"].float()
    student_logits = _logits(
        trainer.model,
        torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        width,
    )
    with torch.no_grad():
        teacher_logits = _logits(
            trainer.teacher_model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], width
        )
    distilled = sdpo_loss_reference_from_logits(
        student_logits,
        teacher_logits,
        mask=completion_mask * route[:, None],
        topk=5,
        alpha=args.distillation_alpha,
        add_tail=args.distillation_add_tail,
        temperature=0.8,
        reduction="sum",
    )["loss"]
    logprobs = torch.log_softmax(student_logits / 0.8, -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    # No rollout log-probs at one step per generation: the ratio is 1 and the policy loss is -A per token.
    assert inputs.get("old_per_token_logps") is None
    ratio = torch.exp(logprobs - logprobs.detach())
    advantages = inputs["advantages"][:, None]
    policy = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    expected = (distilled + (policy * completion_mask * (1 - route)[:, None]).sum()) / completion_mask.sum()
    expected.backward()
    want = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)
    assert got.keys() == want.keys() and len(got) > 0
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=2e-4, atol=2e-6, msg=name)
    # The successes of group 1 carry a positive advantage: the policy side is not empty.
    assert (inputs["advantages"][:2] > 0).all() and distilled.item() > 0
    # GRPOTrainer's "entropy": the student's full-vocabulary entropy at the temperature, over the distilled tokens.
    log_p = torch.log_softmax(student_logits.detach() / 0.8, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    distilled_tokens = completion_mask * route[:, None]
    expected_entropy = ((entropy * distilled_tokens).sum() / distilled_tokens.sum()).item()
    assert trainer._metrics["eval"]["entropy"] == [pytest.approx(expected_entropy, rel=1e-5)]
    logged = trainer._metrics["eval"]["self_distillation/routed_to_distillation_fraction"]
    assert logged == [pytest.approx(3 / 8)]


@pytest.mark.parametrize(
    "overrides, message",
    [({"distillation_weight": 0.5}, "distillation_weight=1.0"), ({"use_teacher_server": True}, "use_teacher_server")],
)
def test_routing_refuses_blend_and_server(overrides, message, tmp_path):
    tokenizer = make_tokenizer()
    model_dir = save_model(tmp_path / "model", tokenizer, make_model(len(tokenizer)))
    args = tiny_sdpo_config(tmp_path / "out", sample_routing=True, **overrides)
    with pytest.raises(ValueError, match=message):
        SDPOTrainer(
            model=model_dir, reward_funcs=_reward, args=args, train_dataset=chat_dataset(), processing_class=tokenizer
        )

"""``use_teacher_server=True``: our ``SDPOTrainer`` against TRL's ``_compute_server_distillation_loss``.

TRL's vLLM client is replaced at its boundary by a local stand-in (the only thing faked): a "server" holding
its own copy of the student (the live teacher of ``teacher_model_kind='live'``), answering ``generate``,
``update_named_params`` (weight sync) and ``get_sequence_logprobs`` the way vLLM does, with the reply formatted by
TRL's own ``VLLMClient._format_sequence_logprobs``. vLLM itself is not installed, so TRL's availability check in
``trl.generation.vllm_generation`` is answered too. Both trainers see the same replies; they must log the same
values (``self_distillation/server_logprob_abs_diff`` included) and update the weights alike over 3 steps, in
float64. TRL turns the server's log-probs into float32 arrays, and for top-K derives the teacher's tail or
renormalisation from them in fp32 arithmetic (ours in float64): those cases are held to a measured fp32 bound
(tolerances.py); "sampled_token" reads the float32 values alone, in float64 arithmetic on both sides.
"""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import TRAINER_DTYPE, TRAINER_FP32_LOG, TRAINER_FP32_WEIGHT_UPDATE, TRAINER_LOG, TRAINER_WEIGHT_UPDATE

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

import trl.generation.vllm_client as vllm_client_module  # noqa: E402
import trl.generation.vllm_generation as vllm_generation_module  # noqa: E402
from adapters_tiny import (  # noqa: E402
    chat_dataset,
    make_model,
    make_tokenizer,
    make_transformed_head_model,
    save_model,
    tiny_sdpo_config,
)
from transformers import AutoModelForCausalLM, set_seed  # noqa: E402
from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer  # noqa: E402

from sdpo_ops.adapters.trl import SDPOTrainer  # noqa: E402

# TRL's own formatting of a vLLM reply (kept before the client class is replaced)
FORMAT_SEQUENCE_LOGPROBS = vllm_client_module.VLLMClient._format_sequence_logprobs
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
TOP_LOGPROBS = 5


class LocalTeacherServer:
    """What the vLLM server computes, in process: sampling and scoring with its own copy of the model, whose
    weights arrive only through ``update_named_params`` (as over NCCL)."""

    def __init__(self, model_dir: str, drop_last_positions: int = 0):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
        self.generate_calls = 0
        self.weight_syncs = 0
        self.scored = 0
        self.drop_last_positions = drop_last_positions  # > 0: a reply missing required positions


class StandInVLLMClient:
    """``trl.generation.vllm_client.VLLMClient``'s methods that TRL's SDPO trainer calls, answered locally."""

    server: LocalTeacherServer  # set by the fixture

    def __init__(self, base_url=None, group_port=51216, connection_timeout=0.0, **_):
        self.base_url = base_url

    def init_communicator(self, device=None):
        pass

    def update_named_params(self, metadata, named_params):
        parameters = dict(self.server.model.named_parameters())
        with torch.no_grad():
            for name, value in named_params:
                parameters[name].copy_(value)
        self.server.weight_syncs += 1

    def reset_prefix_cache(self):
        pass

    @torch.no_grad()
    def generate(self, prompts, n=1, temperature=1.0, max_tokens=16, **_):
        # the same samples for both trainers: the server's own seed per call
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(1000 + self.server.generate_calls)
        self.server.generate_calls += 1
        eos = self.server.model.generation_config.eos_token_id
        completions = []
        for prompt in prompts:
            output = self.server.model.generate(
                input_ids=torch.tensor([prompt] * n), attention_mask=torch.ones(n, len(prompt), dtype=torch.long),
                do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                pad_token_id=self.server.model.generation_config.pad_token_id, eos_token_id=eos,
            )[:, len(prompt):].tolist()  # fmt: skip
            for row in output:  # vLLM's completion ends with its EOS and has no padding
                completions.append(row[: row.index(eos) + 1] if eos in row else row)
        torch.random.set_rng_state(generator_state)
        return {"prompt_ids": prompts, "completion_ids": completions, "logprobs": None, "logprob_token_ids": None}

    @torch.no_grad()
    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0, **_):
        """vLLM's ``prompt_logprobs`` (top-k ranks plus the actual token) per choice, formatted by TRL's code."""
        results = []
        for sequence, prompt_length in zip(sequences, prompt_lengths, strict=True):
            logits = self.server.model(input_ids=torch.tensor([sequence])).logits[0] / temperature
            logprobs = torch.log_softmax(logits, -1)
            positions = [None] * len(sequence)
            for position in range(prompt_length, len(sequence) - self.server.drop_last_positions):
                row = logprobs[position - 1]  # the logits at p - 1 score the token at p
                ranks = row.argsort(descending=True).argsort() + 1
                top = row.topk(top_logprobs).indices.tolist()
                entries = {str(i): {"logprob": float(row[i]), "rank": int(ranks[i])} for i in top}
                actual = sequence[position]
                entries[str(actual)] = {"logprob": float(row[actual]), "rank": int(ranks[actual])}
                positions[position] = entries
            choice = {"prompt_logprobs": positions[: len(sequence) - self.server.drop_last_positions]}
            results.append(FORMAT_SEQUENCE_LOGPROBS(choice, sequence, prompt_length, top_logprobs))
            self.server.scored += 1
        return {key: [result[key] for result in results] for key in results[0]}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    model = make_model(len(tokenizer), dtype=TRAINER_DTYPE)
    return save_model(tmp_path_factory.mktemp("served_qwen2"), tokenizer, model)


@pytest.fixture
def stand_in(monkeypatch):
    """Install the stand-in client where TRL looks it up; returns a function making a fresh server."""
    monkeypatch.setattr(vllm_generation_module, "is_vllm_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(vllm_generation_module, "VLLMClient", StandInVLLMClient)
    monkeypatch.setattr(vllm_client_module, "VLLMClient", StandInVLLMClient)

    def fresh(model_dir, **options):
        StandInVLLMClient.server = LocalTeacherServer(model_dir, **options)
        return StandInVLLMClient.server

    return fresh


def _reward(completion_ids, **kwargs):
    # half the group succeeds: every sample gets a demonstration, none is masked by the reprompting
    return [float(index % 2) for index in range(len(completion_ids))]


def _config(tmp_path, **overrides):
    options = {
        "use_vllm": True,
        "vllm_mode": "server",
        "use_teacher_server": True,
        "teacher_model_kind": "live",
        "distillation_mode": "topk_logits",
        "distillation_topk": TOP_LOGPROBS,
        "max_steps": 3,
    }
    return tiny_sdpo_config(tmp_path / "out", **{**options, **overrides})


def _train(trainer_class, model_dir, tokenizer, args):
    trainer = trainer_class(
        model=model_dir, reward_funcs=[_reward], args=args, train_dataset=chat_dataset(), processing_class=tokenizer
    )
    set_seed(args.seed)
    trainer.train()
    return trainer.state.log_history, {
        name: value.detach().clone() for name, value in trainer.model.state_dict().items()
    }


@pytest.mark.parametrize(
    "options",
    [
        {"distillation_add_tail": True, "distillation_alpha": 0.5},  # TRL's defaults are no tail, alpha 1
        {"distillation_add_tail": False, "distillation_alpha": 1.0},
        {"distillation_mode": "sampled_token", "distillation_alpha": 1.0, "distillation_topk": None},
        # two optimizer steps per generation batch: rollout log-probs (the IS weight) and a weight sync per step
        {"steps_per_generation": 2, "per_device_train_batch_size": 2, "distillation_is_clip": 1.5},
    ],
    ids=["topk-tail-jsd", "topk-renormalised-reverse-kl", "sampled-token", "importance-sampling"],
)
def test_teacher_server_path_equals_trl(options, stand_in, model_dir, tokenizer, tmp_path):
    _assert_same_training_as_trl(stand_in, model_dir, tokenizer, tmp_path, options)


def test_teacher_server_path_with_a_softcapped_head_equals_trl(stand_in, tokenizer, tmp_path):
    """Gemma 2's ``final_logit_softcapping``: the transform reaches the fused loss on the server path too."""
    model = make_transformed_head_model("gemma2", len(tokenizer), dtype=TRAINER_DTYPE)
    model_dir = save_model(tmp_path / "gemma2", tokenizer, model)
    _assert_same_training_as_trl(stand_in, model_dir, tokenizer, tmp_path, {"max_steps": 2})


def _assert_same_training_as_trl(stand_in, model_dir, tokenizer, tmp_path, options):
    logs, weights, servers = {}, {}, {}
    sampled_token = options.get("distillation_mode") == "sampled_token"
    log_tolerance, update_tolerance = (
        (TRAINER_LOG, TRAINER_WEIGHT_UPDATE) if sampled_token else (TRAINER_FP32_LOG, TRAINER_FP32_WEIGHT_UPDATE)
    )
    for name, trainer_class in (("trl", TRLSDPOTrainer), ("ours", SDPOTrainer)):
        servers[name] = stand_in(model_dir)
        logs[name], weights[name] = _train(trainer_class, model_dir, tokenizer, _config(tmp_path / name, **options))
    # the server was used alike: weight syncs, samples and scores
    for counter in ("weight_syncs", "generate_calls", "scored"):
        assert getattr(servers["ours"], counter) == getattr(servers["trl"], counter) > 0, counter
    assert len(logs["ours"]) == len(logs["trl"])
    for our_entry, trl_entry in zip(logs["ours"], logs["trl"], strict=True):
        for key, expected in trl_entry.items():
            if key not in TIMING_KEYS:
                torch.testing.assert_close(
                    torch.tensor(our_entry[key]),
                    torch.tensor(expected),
                    **log_tolerance,
                    msg=lambda m, key=key: f"{key}: {m}",
                )
    assert any("self_distillation/server_logprob_abs_diff" in entry for entry in logs["ours"])
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").state_dict()
    moved = False
    for name, trl_value in weights["trl"].items():
        assert trl_value.dtype == weights["ours"][name].dtype == TRAINER_DTYPE, name
        trl_update, our_update = trl_value - initial[name], weights["ours"][name] - initial[name]
        torch.testing.assert_close(our_update, trl_update, **update_tolerance)
        moved |= bool(trl_update.abs().max() > 0)
    assert moved


def test_missing_required_logprob_raises_trls_error(stand_in, model_dir, tokenizer, tmp_path):
    stand_in(model_dir, drop_last_positions=1)
    # completions that never stop early: the last position of each is required
    args = _config(tmp_path, max_steps=1)
    trainer = SDPOTrainer(
        model=model_dir, reward_funcs=[_reward], args=args, train_dataset=chat_dataset(), processing_class=tokenizer
    )
    with pytest.raises(ValueError, match="Teacher server returned no logprob for a required completion token"):
        trainer.train()


def test_fused_path_never_forms_student_logits(stand_in, model_dir, tokenizer, tmp_path, monkeypatch):
    """Our trainer's loss does not call the model for logits (TRL's ``_forward_logits``) on the server path."""
    stand_in(model_dir)
    calls = []
    original = TRLSDPOTrainer._forward_logits
    monkeypatch.setattr(
        TRLSDPOTrainer, "_forward_logits", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    _train(SDPOTrainer, model_dir, tokenizer, _config(tmp_path, max_steps=1))
    assert not calls

"""TRL's fp32 noise where the trainer-equivalence tests cannot compare both sides in float64 (tests/tolerances.py).

- ``gemma2``: a tiny Gemma 2 in float64 trains to NaN in TRL (its eager attention takes the softmax of a float64
  mask in fp32: -inf on a left-padded row, NaN through the whole row), so test_trl_logit_transforms.py compares its
  runs in fp32. Measured: TRL against TRL with every initial weight moved by one fp32 ulp (random sign), the size
  of the rounding differences two CPUs' kernels make.
- ``server``: TRL stores the teacher server's log-probs as float32 arrays and derives the teacher's tail bucket (or
  renormalisation) from them in fp32 arithmetic, where ours computes in the student's float64: the models run in
  float64 and the teacher's fp32 arithmetic is what remains. Measured: TRL against TRL with every served log-prob
  moved by one fp32 ulp (random sign).

- ``qlora``: a bitsandbytes NF4 base with LoRA on q/v (test_qlora.py) trains in fp32 (4-bit weights have no
  float64). Measured: TRL against TRL with every weight of the fp32 model moved by one fp32 ulp (random sign) before
  it is quantised on load.

For each case: the largest absolute difference of a weight update, the largest relative difference of a logged
value (and where the value is below 1e-6, the largest absolute one), TRL perturbed against TRL and ours against TRL.

    PYTHONPATH=. python tests/scripts/measure_trainer_noise.py [gemma2] [server] [qlora]   (none named: all)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import test_trl_teacher_server as server_test  # noqa: E402
import torch  # noqa: E402
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
from test_trl_adapter import TIMING_KEYS, ScheduledReward, _initial_weights, _train  # noqa: E402
from test_trl_logit_transforms import DISTILLATION_MODES  # noqa: E402
from tolerances import TRAINER_DTYPE  # noqa: E402
from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer  # noqa: E402

from sdpo_ops.adapters.trl import SDPOTrainer  # noqa: E402

SERVER_CASES = {
    "topk-tail-jsd": {"distillation_add_tail": True, "distillation_alpha": 0.5},
    "topk-renormalised-reverse-kl": {"distillation_add_tail": False, "distillation_alpha": 1.0},
    "importance-sampling": {"steps_per_generation": 2, "per_device_train_batch_size": 2, "distillation_is_clip": 1.5},
}


def one_ulp(values: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """``values`` as float32, each moved by one ulp up or down at random (infinities kept)."""
    values = np.asarray(values, dtype=np.float32)
    direction = np.where(generator.random(values.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
    return np.where(np.isfinite(values), np.nextafter(values, direction), values)


def differences(run, reference, initial) -> dict[str, float]:
    logs, weights = run
    reference_logs, reference_weights = reference
    update = max(
        float(((weights[n] - initial[n]).double() - (value - initial[n]).double()).abs().max())
        for n, value in reference_weights.items()
    )
    relative, small_absolute, worst = 0.0, 0.0, None
    for entry, expected_entry in zip(logs, reference_logs, strict=True):
        for key, expected in expected_entry.items():
            if key in TIMING_KEYS or expected is None:
                continue
            difference = abs(float(entry[key]) - float(expected))
            if abs(float(expected)) > 1e-6:
                if difference / abs(float(expected)) > relative:
                    relative, worst = difference / abs(float(expected)), key
            else:
                small_absolute = max(small_absolute, difference)
    return {"update_abs": update, "log_rel": relative, "log_rel_key": worst, "log_abs_below_1e-6": small_absolute}


def gemma2(root: Path, tokenizer) -> None:
    model = make_transformed_head_model("gemma2", len(tokenizer))
    model_dir = save_model(root / "gemma2", tokenizer, model)
    generator = np.random.default_rng(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.from_numpy(one_ulp(parameter.numpy(), generator)))
    perturbed_dir = save_model(root / "gemma2_ulp", tokenizer, model)
    initial = _initial_weights(model_dir)
    for mode, options in DISTILLATION_MODES.items():
        args = tiny_sdpo_config(root / "out", **options)
        trl = _train(TRLSDPOTrainer, model_dir, tokenizer, args, ScheduledReward(), chat_dataset())
        perturbed = _train(TRLSDPOTrainer, perturbed_dir, tokenizer, args, ScheduledReward(), chat_dataset())
        ours = _train(SDPOTrainer, model_dir, tokenizer, args, ScheduledReward(), chat_dataset())
        print(f"gemma2 {mode}: TRL(1 ulp) vs TRL {differences(perturbed, trl, initial)}", flush=True)
        print(f"gemma2 {mode}: ours vs TRL {differences(ours, trl, initial)}", flush=True)


class PerturbedStandIn(server_test.StandInVLLMClient):
    """The stand-in server, each served log-prob moved by one fp32 ulp."""

    generator = np.random.default_rng(0)

    def get_sequence_logprobs(self, *args, **kwargs):
        reply = super().get_sequence_logprobs(*args, **kwargs)
        for key in ("logprobs", "actual_logprobs"):
            reply[key] = [one_ulp(values, self.generator).tolist() for values in reply[key]]
        return reply


def server(root: Path, tokenizer) -> None:
    from transformers import set_seed

    vllm_generation_module.is_vllm_available = lambda *args, **kwargs: True
    model = make_model(len(tokenizer), dtype=TRAINER_DTYPE)
    model_dir = save_model(root / "served", tokenizer, model)
    initial = _initial_weights(model_dir)

    def train(trainer_class, client_class, options, name):
        vllm_generation_module.VLLMClient = vllm_client_module.VLLMClient = client_class
        server_test.StandInVLLMClient.server = server_test.LocalTeacherServer(model_dir)
        args = server_test._config(root / name, **options)
        trainer = trainer_class(
            model=model_dir, reward_funcs=[server_test._reward], args=args, train_dataset=chat_dataset(),
            processing_class=tokenizer,
        )  # fmt: skip
        set_seed(args.seed)
        trainer.train()
        return trainer.state.log_history, {n: v.detach().clone() for n, v in trainer.model.state_dict().items()}

    for case, options in SERVER_CASES.items():
        trl = train(TRLSDPOTrainer, server_test.StandInVLLMClient, options, "trl")
        perturbed = train(TRLSDPOTrainer, PerturbedStandIn, options, "perturbed")
        ours = train(SDPOTrainer, server_test.StandInVLLMClient, options, "ours")
        print(f"server {case}: TRL(1 ulp) vs TRL {differences(perturbed, trl, initial)}", flush=True)
        print(f"server {case}: ours vs TRL {differences(ours, trl, initial)}", flush=True)


def qlora(root: Path, tokenizer) -> None:
    import test_qlora as qlora_test

    model = make_model(len(tokenizer), hidden_size=64, intermediate_size=128, head_dim=16)
    model_dir = save_model(root / "qlora", tokenizer, model)
    generator = np.random.default_rng(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.from_numpy(one_ulp(parameter.numpy(), generator)))
    perturbed_dir = save_model(root / "qlora_ulp", tokenizer, model)
    args = tiny_sdpo_config(root / "out", **qlora_test.QLORA_CASE)
    trl, initial = qlora_test.train_qlora(TRLSDPOTrainer, model_dir, tokenizer, args)
    perturbed, _ = qlora_test.train_qlora(TRLSDPOTrainer, perturbed_dir, tokenizer, args)
    ours, _ = qlora_test.train_qlora(SDPOTrainer, model_dir, tokenizer, args)
    initial = {name: initial.get(name, torch.zeros_like(value)) for name, value in trl[1].items()}
    print(f"qlora: TRL(1 ulp) vs TRL {differences(perturbed, trl, initial)}", flush=True)
    print(f"qlora: ours vs TRL {differences(ours, trl, initial)}", flush=True)


CASES = {"gemma2": gemma2, "server": server, "qlora": qlora}


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    with tempfile.TemporaryDirectory() as root:
        for name in [name for name in sys.argv[1:] if name in CASES] or list(CASES):
            CASES[name](Path(root), tokenizer)


if __name__ == "__main__":
    main()

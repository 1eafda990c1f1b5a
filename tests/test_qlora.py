"""QLoRA: ``sdpo_ops.adapters.trl.SDPOTrainer`` on a bitsandbytes NF4 base with LoRA on q/v, against TRL's trainer;
the hand-written loop's EMA teacher on the same student.

Code under test: the head check and head reading of ``sdpo_ops/adapters/trl_fused.py``, ``heads.py``'s
``head_check_streams``, ``holds_quantized_weight`` and ``refuse_quantized_head`` (also reached through
``model_inputs.backbone_and_head``), and ``teacher.py``'s ``"shadow"`` forward.

bitsandbytes' CPU backend runs the 4-bit layers here. Its ``Linear4bit`` repacks its weight for inference, for good,
on the first forward that is in eval mode with an input without gradient, on CPUs with AVX512-BF16
(``bitsandbytes/nn/modules.py``, ``Linear4bit.forward``); training on the repacked weight then fails. Our head check
once ran such a forward. Where the CPU lacks AVX512-BF16 bitsandbytes never repacks, so the tests also watch its
condition itself: no forward of ours through a 4-bit layer may meet it, on any CPU.

The model is :func:`adapters_tiny.make_model` widened to hidden size 64 (head_dim 16): every 4-bit layer then has an
input width of at least bitsandbytes' block size (64) and an output width that is a multiple of 32, the shapes its
inference repacking accepts (narrower layers fail inside it with another error, hiding the one users meet).
"""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import TRAINER_QLORA_LOG, TRAINER_QLORA_WEIGHT_UPDATE

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
peft = pytest.importorskip("peft")
bitsandbytes = pytest.importorskip("bitsandbytes", reason="the QLoRA tests need bitsandbytes (its CPU backend)")

from adapters_tiny import chat_dataset, make_model, make_tokenizer, save_model, tiny_sdpo_config  # noqa: E402
from test_trl_adapter import ScheduledReward, _assert_same_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed  # noqa: E402
from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer  # noqa: E402

from sdpo_ops.adapters import EMATeacher  # noqa: E402
from sdpo_ops.adapters.model_inputs import backbone_and_head  # noqa: E402
from sdpo_ops.adapters.trl import SDPOTrainer  # noqa: E402

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
QLORA_CASE = {
    "distillation_mode": "topk_logits",
    "distillation_topk": 5,
    "distillation_add_tail": True,
    "distillation_alpha": 0.5,
    "learning_rate": 2.0,
    "model_init_kwargs": None,  # the trainers get the loaded 4-bit model, not a path
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> str:
    """The tiny Qwen2 in fp32 on disk, widened to shapes bitsandbytes' CPU repacking accepts (module docstring)."""
    model = make_model(len(tokenizer), hidden_size=64, intermediate_size=128, head_dim=16)
    return save_model(tmp_path_factory.mktemp("tiny_qwen2_qlora") / "fp32", tokenizer, model)


def load_qlora_base(model_dir: str, **quantization) -> torch.nn.Module:
    """``model_dir`` quantised to NF4 on load (fp32 compute), prepared for k-bit training as a QLoRA recipe does."""
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, **quantization
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu")
    return peft.prepare_model_for_kbit_training(model)


def qlora_trainer(trainer_class, model: torch.nn.Module, tokenizer, args):
    """``trainer_class`` on the 4-bit ``model``, TRL's PEFT set-up adding LoRA on q/v (:data:`LORA`)."""
    return trainer_class(
        model=model,
        reward_funcs=ScheduledReward(),
        args=args,
        train_dataset=chat_dataset(),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(**LORA),
    )


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def train_qlora(trainer_class, model_dir: str, tokenizer, args, model: torch.nn.Module | None = None):
    """``((logs, LoRA weights after), LoRA weights before)`` of ``trainer_class`` trained on the QLoRA base."""
    trainer = qlora_trainer(trainer_class, model or load_qlora_base(model_dir), tokenizer, args)
    initial = lora_weights(trainer.model)
    set_seed(args.seed)
    trainer.train()
    return (trainer.state.log_history, lora_weights(trainer.model)), initial


def _linear4bit_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The 4-bit layers by their name in the unwrapped model (PEFT's ``base_layer.`` step left out)."""
    return {
        name.replace(".base_layer", ""): module
        for name, module in model.named_modules()
        if isinstance(module, bitsandbytes.nn.Linear4bit)
    }


def _snapshot(value):
    """``value`` frozen for comparison: tensors cloned with dtype and shape, a QuantState's fields, recursively."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.detach().clone())
    if isinstance(value, bitsandbytes.functional.QuantState):
        return ("QuantState", {key: _snapshot(field) for key, field in sorted(vars(value).items())})
    if isinstance(value, (list, tuple)):
        return tuple(_snapshot(item) for item in value)
    return value


def quantized_base_state(causal_lm: torch.nn.Module) -> dict[str, object]:
    """Everything of the base model that training must leave as loaded, read directly (no ``state_dict()``, which
    would undo a repacking): per 4-bit layer its weight's storage (data_ptr, dtype, shape, bytes) and every field of
    its quant_state; per other non-LoRA parameter and buffer its data_ptr, dtype, shape and values."""
    state: dict[str, object] = {}
    for name, layer in _linear4bit_layers(causal_lm).items():
        weight = layer.weight
        state[f"{name}.weight"] = (weight.data_ptr(), _snapshot(weight.data))
        state[f"{name}.weight.quant_state"] = _snapshot(weight.quant_state)
        state[f"{name}.packing_format_for_cpu"] = getattr(weight.quant_state, "packing_format_for_cpu", False)
    tensors = [*causal_lm.named_parameters(), *causal_lm.named_buffers()]
    for name, tensor in tensors:
        if "lora_" in name or isinstance(tensor, bitsandbytes.nn.Params4bit):
            continue
        state[name.replace(".base_layer", "")] = (tensor.data_ptr(), _snapshot(tensor))
    return state


def assert_same_state(after: dict[str, object], before: dict[str, object]) -> None:
    assert after.keys() == before.keys()
    for key, expected in before.items():
        _assert_same(after[key], expected, key)


def _assert_same(actual, expected, where: str) -> None:
    if isinstance(expected, tuple) and expected and expected[0] == "tensor":
        assert actual[:3] == expected[:3], f"{where}: {actual[:3]} != {expected[:3]}"
        assert torch.equal(actual[3], expected[3]), f"{where}: values changed"
    elif isinstance(expected, tuple) and expected and expected[0] == "QuantState":
        assert actual[0] == "QuantState" and actual[1].keys() == expected[1].keys(), f"{where}: fields changed"
        for key in expected[1]:
            _assert_same(actual[1][key], expected[1][key], f"{where}.{key}")
    elif isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for index, (item, expected_item) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(item, expected_item, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


class RepackingForwards:
    """Counts the forwards through 4-bit layers that meet bitsandbytes' inference-repacking condition (a CPU input
    without gradient, the layer in eval mode), and all forwards through them."""

    def __init__(self, model: torch.nn.Module):
        self.repacking, self.total = 0, 0
        self.handles = [layer.register_forward_pre_hook(self._record) for layer in _linear4bit_layers(model).values()]

    def _record(self, layer, args) -> None:
        self.total += 1
        hidden = args[0]
        if hidden.device.type == "cpu" and not layer.training and not hidden.requires_grad:
            self.repacking += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_constructing_our_trainer_leaves_the_quantized_base_unchanged(model_dir, tokenizer, tmp_path):
    """No forward at construction, nothing cast or moved: the 4-bit storage, its quant_state and every other
    parameter are the very tensors loaded, and the base's state_dict is the same."""
    model = load_qlora_base(model_dir)
    before, state_dict = quantized_base_state(model), model.state_dict()
    forwards = RepackingForwards(model)
    trainer = qlora_trainer(SDPOTrainer, model, tokenizer, tiny_sdpo_config(tmp_path, **QLORA_CASE))
    forwards.remove()
    causal_lm = trainer.model.base_model.model
    assert causal_lm is model  # PEFT wrapped the very model in place
    assert forwards.total == 0
    assert_same_state(quantized_base_state(causal_lm), before)
    after = {
        key.replace(".base_layer", ""): value for key, value in causal_lm.state_dict().items() if "lora_" not in key
    }
    assert after.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def test_qlora_trains_like_trl_and_leaves_the_base_as_loaded(model_dir, tokenizer, tmp_path):
    """Two SGD steps with the LoRA EMA teacher: our losses, metrics and LoRA updates (student and teacher adapters)
    equal TRL's within the fp32 noise measured for this case (tolerances.py); our run never puts a 4-bit layer in
    bitsandbytes' repacking condition, and leaves the quantised base exactly as loaded."""
    args = tiny_sdpo_config(tmp_path, **QLORA_CASE)
    theirs, initial = train_qlora(TRLSDPOTrainer, model_dir, tokenizer, args)

    model = load_qlora_base(model_dir)
    before = quantized_base_state(model)
    forwards = RepackingForwards(model)
    ours, our_initial = train_qlora(SDPOTrainer, model_dir, tokenizer, args, model=model)
    forwards.remove()
    assert forwards.total > 0 and forwards.repacking == 0, f"{forwards.repacking} of {forwards.total} forwards"
    assert_same_state(quantized_base_state(model), before)

    assert our_initial.keys() == initial.keys()
    for name, value in initial.items():  # same seed, same adapter initialisation
        torch.testing.assert_close(our_initial[name], value, rtol=0, atol=0)
    # TRL adds the EMA "teacher" adapter at train begin, zero-initialised.
    initial = {name: initial.get(name, torch.zeros_like(value)) for name, value in theirs[1].items()}
    assert any(".teacher." in name for name in initial)
    _assert_same_training(
        ours,
        theirs,
        initial,
        dtype=torch.float32,
        log_tolerance=TRAINER_QLORA_LOG,
        update_tolerance=TRAINER_QLORA_WEIGHT_UPDATE,
    )


def test_a_quantized_lm_head_is_refused_at_construction(model_dir, tokenizer, tmp_path):
    """``llm_int8_skip_modules=[]`` quantises the lm_head too: refused before training, naming it and the fix."""
    model = load_qlora_base(model_dir, llm_int8_skip_modules=[])
    assert isinstance(model.lm_head, bitsandbytes.nn.Linear4bit)
    with pytest.raises(ValueError, match=r"`lm_head`.*Linear4bit.*quantised.*llm_int8_skip_modules=\[\"lm_head\"\]"):
        qlora_trainer(SDPOTrainer, model, tokenizer, tiny_sdpo_config(tmp_path, **QLORA_CASE))
    # The hand-written loop's head helper (sdpo_step, head_inputs) refuses it alike.
    with pytest.raises(ValueError, match=r"`lm_head`.*quantised"):
        backbone_and_head(model)


def test_plain_loop_shadow_teacher_leaves_the_qlora_student_trainable(model_dir):
    """In ``"shadow"`` mode the EMA teacher runs the student itself with the shadow adapter: its forward turns dropout
    off but must not put a 4-bit layer in bitsandbytes' repacking condition, and the student must train afterwards
    with its base exactly as loaded."""
    student = peft.get_peft_model(load_qlora_base(model_dir), peft.LoraConfig(**{**LORA, "lora_dropout": 0.1}))
    causal_lm = student.base_model.model
    student.train()
    teacher = EMATeacher(student, mode="shadow")
    before = quantized_base_state(causal_lm)
    input_ids = torch.arange(1, 9).reshape(1, 8)

    forwards = RepackingForwards(causal_lm)
    with teacher.forward_context() as model:
        dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
        assert dropouts and not any(module.training for module in dropouts)
        model(input_ids=input_ids)
    forwards.remove()
    assert forwards.total > 0 and forwards.repacking == 0, f"{forwards.repacking} of {forwards.total} forwards"
    assert all(module.training for module in student.modules())  # the student's modes are restored

    loss = student(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = [p.grad for name, p in student.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert_same_state(quantized_base_state(causal_lm), before)

"""Tiny causal LMs (Qwen2, OPT, heads with logit transforms), a char-level chat tokenizer, TRL set-ups (CPU, ms)."""

from __future__ import annotations

import string

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARACTERS = string.ascii_letters + string.digits + " \n.,:;!?<>/'-_()=+"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, ``<|im_start|>``/``<|im_end|>`` chat markers, ``<pad>`` = id 0."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(
    vocab_size: int,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 with hidden size 32 (``overrides``: other config values, sizes included), random weights
    (``dtype``: the fp32 initialisation, cast), eval mode."""
    torch.manual_seed(seed)
    options = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie_word_embeddings,
    }
    config = Qwen2Config(**{**options, **overrides})
    model = Qwen2ForCausalLM(config)
    # Random init of this size gives near-uniform logits; a wider spread makes the loss (and bugs) visible.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.to(dtype).eval()


def make_opt_model(
    vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> OPTForCausalLM:
    """A 2-layer OPT with hidden size 32 and OPT's default ``dropout=0.1``: applied functionally
    (``nn.functional.dropout``), so TRL's ``disable_dropout`` leaves it live in training mode."""
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        **overrides,
    )
    model = OPTForCausalLM(config)
    assert config.dropout > 0, "the point of this model is its live dropout"
    # Tied head and embeddings: widen the logits 5x (20x would make the model echo its input).
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    return model.to(dtype).eval()


# Heads that post-process `lm_head(hidden)`, as each model's own forward does it (transformers 5, modeling_*.py):
# Gemma 2 `cap * tanh(logits / cap)`, Cohere `logits * logit_scale`, Granite `logits / logits_scaling`.
LOGIT_TRANSFORMS = {
    "gemma2": {"final_logit_softcapping": 3.0, "head_dim": 8},
    "cohere": {"logit_scale": 0.25},
    "granite": {"logits_scaling": 4.0},
}
# Head widening of `make_transformed_head_model`: the *transformed* logits get make_model's spread (std ~2, up to
# ~8), the one the trainer tolerances were set for (peakier logits lose more fp32 precision in the loss's gradient,
# transform or not). So the raw logits are 4x wider where a scale of 1/4 shrinks them, as real heads shrink large
# raw logits (CohereConfig's default logit_scale is 0.0625); under the cap of 3 they reach ~7, where tanh saturates.
HEAD_GAINS = {"gemma2": 20.0, "cohere": 80.0, "granite": 80.0}


def make_transformed_head_model(
    model_type: str, vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
):
    """A 2-layer ``model_type`` causal LM with hidden size 32, untied, ``LOGIT_TRANSFORMS[model_type]`` set (if
    any), random weights, the head widened by ``HEAD_GAINS[model_type]`` (default 20, as :func:`make_model`),
    ``dtype``, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    options = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        **LOGIT_TRANSFORMS.get(model_type, {}),
        **overrides,
    }
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **options))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_GAINS.get(model_type, 20.0))
    return model.to(dtype).eval()


PROMPTS = ["add 2 and 3", "name a color", "spell cat", "count to 4"]


def save_model(directory, tokenizer, model) -> str:
    """Save ``model`` and ``tokenizer`` to ``directory`` (TRL builds teacher copies from a path), pad = eos ids set."""
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def chat_dataset(**columns):
    """The four :data:`PROMPTS` as one-turn conversations (plus extra dataset columns)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": text}] for text in PROMPTS], **columns})


def _tiny_trainer_options(output_dir, **overrides) -> dict:
    """The options of :func:`tiny_sdpo_config` and :func:`tiny_sdft_config` (fields both configs have)."""
    options = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_prompt_length": 64,
        # Two generation batches (ScheduledReward's first two patterns: distilled and masked samples).
        "max_steps": 2,
        # Plain SGD: Adam's first step is ~lr * sign(grad), which would turn float-rounding differences
        # of near-zero gradient entries into lr-sized weight differences.
        "optim": "sgd",
        "learning_rate": 0.5,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,  # TRL defaults to bf16 autocast; the equivalence is checked without it
        # TRL loads a model path in float32 unless told; "auto" keeps the saved dtype (float64 for the equivalence
        # tests, tolerances.TRAINER_DTYPE). TRL builds its teacher copy with the same kwargs.
        "model_init_kwargs": {"dtype": "auto"},
        "seed": 0,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    options.update(overrides)
    return options


def tiny_sdpo_config(output_dir, **overrides):
    """An ``SDPOConfig`` for two CPU steps on one group of 4 completions of 8 tokens, no autocast, plain SGD, the
    model (and TRL's teacher copy of it) loaded in the dtype it was saved in."""
    from sdpo_ops.adapters.trl import SDPOConfig

    return SDPOConfig(**_tiny_trainer_options(output_dir, **overrides))


def tiny_sdft_config(output_dir, **overrides):
    """An ``SDFTConfig`` with :func:`tiny_sdpo_config`'s options (two CPU steps, 4 completions of 8 tokens, SGD)."""
    from sdpo_ops.adapters.trl import SDFTConfig

    return SDFTConfig(**_tiny_trainer_options(output_dir, **overrides))

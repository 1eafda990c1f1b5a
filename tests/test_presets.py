"""``sdpo_ops.presets``: each preset is its source's defaults, read from the source where it is code."""

from __future__ import annotations

import dataclasses
import inspect
import os

import pytest
import torch

import sdpo_ops
from sdpo_ops import sdpo_loss
from sdpo_ops.presets import OFFICIAL, TRL


def test_trl_preset_is_trl_sdpo_config_defaults():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    config = pytest.importorskip("trl.experimental.sdpo").SDPOConfig
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    assert TRL["add_tail"] is defaults["distillation_add_tail"]
    assert TRL["alpha"] == defaults["distillation_alpha"]
    assert TRL["is_clip"] == defaults["distillation_is_clip"]
    assert TRL["temperature"] == defaults["temperature"]
    # TRL's trainer reduces by the per-sequence mean (SDPOTrainer._compute_*_distillation_loss), not a config field.
    assert TRL["reduction"] == "seq-mean-token-mean"


def test_official_preset_is_sdpo_loss_defaults():
    """The options table's "official SDPO (verl)" column, which sdpo_loss's defaults follow."""
    signature = inspect.signature(sdpo_loss).parameters
    assert {name: signature[name].default for name in OFFICIAL} == dict(OFFICIAL)
    assert dict(OFFICIAL) == {
        "add_tail": True, "alpha": 0.5, "is_clip": 2.0, "temperature": 1.0, "reduction": "token-mean",
    }  # fmt: skip


def test_presets_unpack_into_sdpo_loss_and_are_read_only():
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 8), torch.randn(30, 8), torch.randn(2, 3, 8), torch.randn(30, 8))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    with_preset = sdpo_loss(*inputs, mask=mask, topk=5, **sdpo_ops.presets.TRL)
    spelled_out = sdpo_loss(*inputs, mask=mask, topk=5, add_tail=False, alpha=1.0, reduction="seq-mean-token-mean")
    assert torch.equal(with_preset, spelled_out)
    assert not torch.equal(with_preset, sdpo_loss(*inputs, mask=mask, topk=5, **OFFICIAL))
    with pytest.raises(TypeError):
        TRL["alpha"] = 0.5  # type: ignore[index]

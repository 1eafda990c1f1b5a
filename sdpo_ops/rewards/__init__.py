"""Reward functions with feedback for SDPO.

- :class:`CodeReward` (:mod:`sdpo_ops.rewards.code`): run completions' Python against tests, feedback = what failed;
- :class:`Sandbox`, :class:`SandboxLimits` (:mod:`sdpo_ops.rewards.sandbox`): how untrusted programs run (Linux).
"""

from sdpo_ops.rewards.code import CodeReward, extract_code
from sdpo_ops.rewards.sandbox import RunResult, Sandbox, SandboxLimits

__all__ = ["CodeReward", "RunResult", "Sandbox", "SandboxLimits", "extract_code"]

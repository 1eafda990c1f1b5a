"""Demonstration selection: hand-computed groups, thresholds, token-level rewards, and a brute-force oracle."""

import doctest
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdpo_ops.adapters.demonstrations as demonstrations_module
from sdpo_ops.adapters import OFFICIAL_SUCCESS_THRESHOLD, TRL_SUCCESS_THRESHOLD, select_demonstrations


def test_first_other_success_of_the_group():
    # group 0: successes {1, 2}; group 1: a lone success at 4.
    rewards = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert select_demonstrations(rewards, 3) == [1, 2, 1, 4, None, 4]


def test_self_allowed_when_not_excluding():
    rewards = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert select_demonstrations(rewards, 3, dont_reprompt_on_self_success=False) == [1, 1, 1, 4, 4, 4]


def test_no_success_no_demonstration():
    assert select_demonstrations([0.0, 0.2, 0.4, 0.1], 2) == [None, None, None, None]


def test_threshold_is_inclusive_and_configurable():
    rewards = [0.5, 0.7, 1.0, 0.99]
    assert OFFICIAL_SUCCESS_THRESHOLD == 0.5 and TRL_SUCCESS_THRESHOLD == 1.0
    assert select_demonstrations(rewards, 2) == [1, 0, 3, 2]
    # TRL's threshold: only the exact 1.0 counts, and it is alone in its group.
    assert select_demonstrations(rewards, 2, success_threshold=TRL_SUCCESS_THRESHOLD) == [None, None, None, 2]


def test_token_level_rewards_are_summed():
    # Sums: 0.6, 0.2, 0.0, 0.9 -> successes 0 and 3 at threshold 0.5.
    token_rewards = torch.tensor([[0.3, 0.3], [0.1, 0.1], [0.0, 0.0], [0.0, 0.9]])
    assert select_demonstrations(token_rewards, 2) == [None, 0, 3, None]
    assert select_demonstrations(token_rewards.sum(-1), 2) == [None, 0, 3, None]


def test_missing_rewards_are_failures():
    assert select_demonstrations([None, 1.0, math.nan, 1.0], 2) == [1, None, 3, None]


@pytest.mark.parametrize(
    ("rewards", "group_size", "message"),
    [([1.0, 0.0, 1.0], 2, "multiple of group_size"), ([1.0], 0, "group_size"), (torch.zeros(2, 2, 2), 2, "shape")],
)
def test_bad_input(rewards, group_size, message):
    with pytest.raises(ValueError, match=message):
        select_demonstrations(rewards, group_size)


def _brute_force(rewards, group_size, threshold, exclude_self):
    """Independent oracle: the smallest index in the group's success set (minus self)."""
    chosen = []
    for i in range(len(rewards)):
        group = set(range(i // group_size * group_size, (i // group_size + 1) * group_size))
        winners = {j for j in group if rewards[j] >= threshold} - ({i} if exclude_self else set())
        chosen.append(min(winners) if winners else None)
    return chosen


@given(
    group_size=st.integers(1, 5),
    num_groups=st.integers(1, 4),
    data=st.data(),
    threshold=st.sampled_from([0.5, 1.0]),
    exclude_self=st.booleans(),
)
def test_matches_brute_force(group_size, num_groups, data, threshold, exclude_self):
    rewards = data.draw(
        st.lists(
            st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
            min_size=group_size * num_groups,
            max_size=group_size * num_groups,
        )
    )
    got = select_demonstrations(
        rewards, group_size, success_threshold=threshold, dont_reprompt_on_self_success=exclude_self
    )
    assert got == _brute_force(rewards, group_size, threshold, exclude_self)
    # A lone success in its group never demonstrates to itself when excluding self.
    for i, index in enumerate(got):
        if exclude_self:
            assert index != i


def test_docstring_examples():
    assert doctest.testmod(demonstrations_module).failed == 0

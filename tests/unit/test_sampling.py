"""Dynamic sampling's pure part: which groups have nothing to learn."""

import torch

from alphaalign.rl.sampling import all_equal_groups


def test_all_equal_groups_are_the_ones_with_nothing_to_learn():
    nan = float("nan")
    rewards = torch.tensor(
        [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, nan, 0.5, 0.5, nan, 2.0, nan, nan, nan, nan, 0.3, 0.3, 0.30001]
    )
    assert all_equal_groups(rewards, 3).tolist() == [True, False, True, True, True, False]

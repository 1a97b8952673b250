"""Replay picks by value, and comes back to the sample trained longest ago, whose recorded loss is only as
new as its last training."""

from __future__ import annotations

from mace.train.replay import REVISIT_EVERY, ReplayBuffer, TrainSample


def _train(replay: ReplayBuffer) -> int:
    """Pick one sample and fit it, as a micro-step would; its id."""
    batch = replay.pick(max_tokens=100, now_s=0.0, max_samples=1)
    assert batch is not None
    batch.samples[0].loss = 0.01  # fitted: by value alone it would not come back
    return batch.samples[0].sample_id


def test_every_revisit_every_th_pick_is_the_sample_trained_longest_ago() -> None:
    assert REVISIT_EVERY == 4  # the expected order below is written for it
    replay = ReplayBuffer(window=16, half_life_s=600.0)
    replay.add(TrainSample(1, [1, 2, 3], 2, created_at=0.0, loss=3.0))
    assert _train(replay) == 1
    for sample_id in range(2, 12):
        replay.add(TrainSample(sample_id, [sample_id, 2, 3], 2, created_at=0.0, loss=2.0 + sample_id))
    picked = [_train(replay) for _ in range(8)]
    assert picked == [11, 10, 1, 9, 8, 7, 11, 6]


def test_a_sample_that_leaves_the_window_is_not_revisited() -> None:
    replay = ReplayBuffer(window=2, half_life_s=600.0)
    old = TrainSample(1, [1, 2, 3], 2, created_at=0.0)
    replay.add(old)
    assert replay.pick(max_tokens=100, now_s=0.0, max_samples=1) is not None
    for sample_id in (2, 3):  # the window evicts the picked one
        replay.add(TrainSample(sample_id, [sample_id, 2, 3], 2, created_at=0.0))
    picks = [replay.pick(max_tokens=100, now_s=0.0, max_samples=1) for _ in range(2 * REVISIT_EVERY)]
    assert all(batch is not None and batch.samples[0] is not old for batch in picks)

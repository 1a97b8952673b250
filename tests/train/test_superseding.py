"""A newer correction that answers the same prompt differently supersedes the older ones, in replay and
in the held-out slice; the same answer again is kept."""

from __future__ import annotations

from mace.train.replay import ReplayBuffer, TrainSample
from mace.train.trainer import Trainer

CITY = [11, 12, 13]  # a prompt: "Which city do I live in?"
PET = [21, 22, 23]


def _sample(sample_id: int, prompt: list[int], answer: int, loss: float = 1.0) -> TrainSample:
    return TrainSample(sample_id, [*prompt, answer], len(prompt), created_at=float(sample_id), loss=loss)


def _picked(replay: ReplayBuffer) -> set[int]:
    chunk = replay.pick(max_tokens=10_000, now_s=100.0, max_samples=100)
    return {sample.sample_id for sample in chunk.samples} if chunk else set()


def test_a_newer_answer_to_the_same_prompt_replaces_the_older_in_replay() -> None:
    replay = ReplayBuffer(window=8, half_life_s=600.0)
    replay.add(_sample(1, CITY, answer=50, loss=5.0))  # the old answer: high loss once the new one is learned
    replay.add(_sample(2, PET, answer=60))
    replay.add(_sample(3, CITY, answer=51, loss=0.5))
    assert len(replay) == 2 and _picked(replay) == {2, 3}


def test_the_same_answer_again_is_kept_and_a_change_drops_every_earlier_one() -> None:
    replay = ReplayBuffer(window=8, half_life_s=600.0)
    replay.add(_sample(1, CITY, answer=50))
    replay.add(_sample(2, CITY, answer=50))
    assert _picked(replay) == {1, 2}
    replay.add(_sample(3, CITY, answer=51))
    assert _picked(replay) == {3}


def test_prompts_that_differ_only_in_their_answer_position_are_kept_apart() -> None:
    replay = ReplayBuffer(window=8, half_life_s=600.0)
    replay.add(_sample(1, CITY, answer=50))
    replay.add(TrainSample(2, [*CITY, 50], len(CITY) + 1, created_at=2.0))  # a longer prompt
    assert _picked(replay) == {1, 2}


def test_the_window_evicts_the_oldest_and_forgets_its_prompt() -> None:
    replay = ReplayBuffer(window=2, half_life_s=600.0)
    replay.add(_sample(1, CITY, answer=50))
    replay.add(_sample(2, PET, answer=60))
    replay.add(_sample(3, [31], answer=70))  # the window evicts 1
    replay.add(_sample(4, CITY, answer=51))  # evicts 2; nothing left to supersede
    replay.add(_sample(5, [41], answer=80))  # evicts 3
    assert _picked(replay) == {4, 5}
    assert len(replay._by_prompt) == len(replay)  # no prompt index left behind for evicted samples


def test_a_held_out_answer_the_user_corrected_since_leaves_the_gates_slice(trainer: Trainer) -> None:
    intake = trainer.intake
    intake.accept(_sample(1, CITY, answer=50), held_out=True, loss=1.0)
    intake.accept(_sample(2, PET, answer=60), held_out=True, loss=1.0)
    intake.accept(_sample(3, CITY, answer=51), held_out=False, loss=3.0)  # a training sample corrects it
    assert [sample.sample_id for sample in intake.heldout] == [2]
    assert _picked(trainer.replay) == {3}
    intake.accept(_sample(4, PET, answer=61), held_out=True, loss=3.0)
    intake.accept(_sample(5, PET, answer=61), held_out=False, loss=3.0)  # confirms it
    assert [sample.sample_id for sample in intake.heldout] == [4]


def test_the_buffer_fits_only_when_every_sample_is_under_the_loss() -> None:
    buffer = ReplayBuffer(window=8, half_life_s=600.0)
    assert not buffer.all_fit(0.1)  # nothing to fit is not converged: nothing was taught
    fitted, unfitted = TrainSample(1, [1, 2, 3], 1, 0.0, loss=0.05), TrainSample(2, [4, 5, 6], 1, 0.0, loss=2.0)
    buffer.add(fitted)
    assert buffer.all_fit(0.1)
    buffer.add(unfitted)
    assert not buffer.all_fit(0.1) and buffer.newest(1) == [unfitted] and buffer.newest(5) == [fitted, unfitted]


def test_a_held_out_correction_drops_the_older_answer_from_replay(trainer: Trainer) -> None:
    # The user's newest answer was held out: training must not keep teaching the one it replaced.
    intake = trainer.intake
    intake.accept(_sample(1, CITY, answer=50), held_out=False, loss=1.0)
    intake.accept(_sample(2, PET, answer=60), held_out=False, loss=1.0)
    intake.accept(_sample(3, CITY, answer=51), held_out=True, loss=1.0)
    assert _picked(trainer.replay) == {2}
    assert not trainer.replay.teaches(_sample(3, CITY, answer=51).prompt_key)
    intake.accept(_sample(4, PET, answer=60), held_out=True, loss=1.0)  # the same answer: still taught
    assert _picked(trainer.replay) == {2} and trainer.replay.teaches(_sample(4, PET, answer=60).prompt_key)

"""Retention in the trainer: a user whose every event has left the event log is erased from
every per-user table, replay included, and is gone from the next export and checkpoint."""

from __future__ import annotations

import json

import numpy as np

from services.trainer.checkpoint import restore, to_bytes
from services.trainer.export import USER_IDS, export_learner
from tests.factories import event
from tests.trainer.streams import T0, small_learner


def test_users_with_nothing_left_in_the_log_are_erased_everywhere() -> None:
    learner = small_learner(replay_size=64)
    old = [(n, event("leaver", f"i{n % 7}", at=T0 + n)) for n in range(1, 41)]
    stays = [(40 + n, event("stayer", f"i{n % 7}", at=T0 + 40 + n)) for n in range(1, 41)]
    for start in range(0, 80, 10):
        learner.learn((old + stays)[start : start + 10])
    leaver_row = learner.users.get("leaver")
    assert leaver_row and np.isin(learner.replay.users[: learner.replay.size], [leaver_row]).any()
    before = learner.trained.user_ids.weight[leaver_row].clone()

    assert learner.forget_users_before(first_sequence=41) == 1  # the log now begins after the leaver
    assert learner.users.get("leaver") == 0
    for table in (learner.histories, learner.seen, learner.user_seen_at, learner.user_last_sequence):
        assert "leaver" not in table and "stayer" in table
    assert learner.signals.preprocessor.users.get("leaver") is None
    assert not np.isin(learner.replay.users[: learner.replay.size], [leaver_row]).any()
    assert learner.replay.size > 0  # the stayer's chunks remain
    assert not bool((learner.trained.user_ids.weight[leaver_row] == before).all())  # the row was reset
    assert learner.forget_users_before(first_sequence=41) == 0

    user_ids = json.loads(export_learner(learner, None).files[USER_IDS])
    assert "leaver" not in user_ids and "stayer" in user_ids
    restored = small_learner(replay_size=64)
    restore(restored, to_bytes(learner))
    assert "leaver" not in restored.user_last_sequence and "leaver" not in restored.histories
    assert restored.user_last_sequence == learner.user_last_sequence
    # A user who comes back is a new user.
    learner.learn([(81, event("leaver", "i1", at=T0 + 81))])
    assert list(learner.histories["leaver"])[0][0] == learner.items.get("i1")
    assert len(learner.histories["leaver"]) == 1

"""The bookkeeping behind exactly-once republishing: seq ranges and the reconciler's rule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.ingestion.reconcile import RangeSet, Reconciler
from services.ingestion.store import OutboxEvent, seq_ranges


def test_seq_ranges_are_runs_of_consecutive_seqs() -> None:
    assert seq_ranges([]) == []
    assert seq_ranges([5, 1, 2, 3, 7, 8, 8]) == [(1, 3), (5, 5), (7, 8)]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 8)), max_size=40))
def test_range_set_behaves_like_a_set(operations: list[tuple[bool, int, int]]) -> None:
    ranges = RangeSet()
    model: set[int] = set()
    for add, lo, width in operations:
        hi = lo + width
        if add:
            ranges.add(lo, hi)
            model |= set(range(lo, hi + 1))
        else:
            ranges.discard(lo, hi)
            model -= set(range(lo, hi + 1))
        assert len(ranges) == len(model)
        assert all((n in ranges) == (n in model) for n in range(-1, 75))
        bounds = ranges.ranges
        assert all(a[1] + 1 < b[0] for a, b in zip(bounds, bounds[1:], strict=False)), "kept merged"


def test_add_all_merges_runs() -> None:
    ranges = RangeSet()
    ranges.add_all([9, 3, 4, 5, 10, 20])
    assert ranges.ranges == [(3, 5), (9, 10), (20, 20)]


def outbox(seq: int, received_at_s: float) -> OutboxEvent:
    return OutboxEvent(seq, f"e{seq}", 2, "u", b"", int(received_at_s * 1e6))


def test_the_rule_for_republishing_without_a_lookup() -> None:
    async def mark(ids: list[str]) -> int:
        return 0

    never_sent = RangeSet()
    rec = Reconciler(None, "S", "s.>", mark, window_s=120, margin_s=30, clock_skew_s=5, never_sent=never_sent)  # type: ignore[arg-type]
    now = 10_000.0
    assert rec.safe(outbox(1, now - 10), now)  # young: JetStream drops a copy
    assert rec.safe(outbox(2, now - 89), now)
    assert not rec.safe(outbox(3, now - 91), now)  # a copy may be older than the window allows
    never_sent.add(3, 3)
    assert rec.safe(outbox(3, now - 91), now)  # never sent: no copy can exist
    # After a scan that began at S and covered everything from the floor, S bounds any unseen copy.
    rec.scan_floor_s, rec.scan_started_s = now - 500, now - 20
    assert rec.safe(outbox(4, now - 400), now)
    assert not rec.safe(outbox(5, now - 600), now)  # older than what the scan covered
    assert not rec.safe(outbox(4, now - 400), now + 80)  # the scan itself is too long ago

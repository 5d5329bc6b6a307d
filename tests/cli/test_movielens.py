"""Reading MovieLens-style files: the three layouts, time order, ids, timestamps, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.movielens import FormatError, Rating, read_ratings, to_event
from freshrec.v1 import event_pb2
from tests.conftest import ML100K


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="MovieLens-100K is not available")
def test_ml100k_u_data_is_read_whole_and_in_time_order() -> None:
    ratings = read_ratings(ML100K / "u.data")
    assert len(ratings) == 100_000
    assert len({r.user for r in ratings}) == 943 and len({r.item for r in ratings}) == 1682
    keys = [(r.timestamp, r.user, r.item) for r in ratings]
    assert keys == sorted(keys)
    assert {r.rating for r in ratings} == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 874_724_710 <= ratings[0].timestamp and ratings[-1].timestamp <= 893_286_638


def test_ratings_csv_with_a_header(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n2,10,3.5,1200\n1,20,4.0,1100\n1,5,5.0,1200\n")
    assert read_ratings(path) == [
        Rating(1100, "1", "20", 4.0),
        Rating(1200, "1", "5", 5.0),
        Rating(1200, "2", "10", 3.5),
    ]


def test_columns_found_by_name_in_any_order(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("timestamp,rating,item_id,user_id\n50,1,i9,u1\n")
    assert read_ratings(path) == [Rating(50, "u1", "i9", 1.0)]


def test_ratings_dat(tmp_path: Path) -> None:
    path = tmp_path / "ratings.dat"
    path.write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    assert [r.item for r in read_ratings(path)] == ["1193", "661"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("a b c\n", "cannot tell the layout"),
        ("user,item,stars,when\n1,2,3,4\n", "no rating column"),
        ("1\t2\tfive\t100\n", "not a number"),
        ("1\t2\t3\n", "expected user"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.data"
    path.write_text(content)
    with pytest.raises(FormatError, match=message):
        read_ratings(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="does not exist"):
        read_ratings(tmp_path / "nope.data")


def test_events_keep_or_shift_time_and_have_stable_ids() -> None:
    rating = Rating(timestamp=880_000_000, user="7", item="42", rating=4.0)
    kept = to_event(rating)
    assert kept.type == event_pb2.EVENT_TYPE_RATE and kept.value == 4.0
    assert (kept.user_id, kept.item_id) == ("7", "42")
    assert kept.occurred_at.seconds == 880_000_000
    shifted = to_event(rating, shift_s=1000.0, prefix="ml:")
    assert shifted.occurred_at.seconds == 880_001_000
    assert (shifted.user_id, shifted.item_id) == ("ml:7", "ml:42")
    # The id depends on the rating, not on the shift: replaying the same file twice deduplicates.
    assert to_event(rating, shift_s=5.0).event_id == kept.event_id

"""Settings every service shares: a variable renamed since an earlier version stops the start with
its new name, rather than being ignored while the service runs on the default."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.feature.settings import FeatureSettings
from shared.settings import ServiceSettings


def test_a_renamed_variable_is_refused_with_its_new_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_CATALOG__MAX_TAGS", "3")
    with pytest.raises(
        ValidationError, match="FRESHREC_CATALOG__MAX_TAGS is now named FRESHREC_CATALOGUE__MAX_TAGS"
    ):
        FeatureSettings()
    with pytest.raises(ValidationError, match="rename it"):
        ServiceSettings()


def test_the_new_name_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_CATALOGUE__MAX_TAGS", "3")
    assert FeatureSettings().catalogue.max_tags == 3


def test_popularity_in_seconds_is_refused_for_its_count_of_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_POPULARITY__HALF_LIFE_S", "3600")
    with pytest.raises(ValidationError, match="now named FRESHREC_POPULARITY__HALF_LIFE_EVENTS"):
        FeatureSettings()
    monkeypatch.delenv("FRESHREC_POPULARITY__HALF_LIFE_S")
    monkeypatch.setenv("FRESHREC_POPULARITY__HALF_LIFE_EVENTS", "500")
    assert FeatureSettings().popularity.half_life_events == 500

"""The trainer's tests live in ``tests/trainer/``; this module keeps ``taste_stream`` importable
for the inference and security tests that build models with it."""

from __future__ import annotations

from tests.trainer.streams import taste_stream

__all__ = ["taste_stream"]

"""Content transfer from the `text` extra (all-MiniLM-L6-v2 shipped as a package, never
downloaded), and the trainer working the same without it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from services.trainer import server, text
from services.trainer.export import ITEM_EMBEDDINGS, ITEM_IDS, export_learner
from services.trainer.settings import TrainerSettings
from tests.factories import event
from tests.trainer.streams import T0, catalogue_item, small_learner

needs_text = pytest.mark.skipif(not text.text_extra_installed(), reason="the `text` extra is not installed")


@pytest.mark.slow
@needs_text
def test_titles_are_embedded_offline_and_reach_the_exported_item_vectors(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = text.make_text_encoder("on")
    assert encoder is not None
    titles = ["A gentle romantic comedy in Paris", "Romantic comedy set in Rome", "Alien invasion war epic"]
    vectors = encoder.encode(titles)
    assert vectors.shape == (3, text.TEXT_DIM) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # similar titles sit close

    learner = small_learner(model_text_dim=text.TEXT_DIM)
    items = [catalogue_item(f"i{n}", ["film"], title=t) for n, t in enumerate(titles)]
    learner.add_items(list(enumerate(items, start=1)), vectors)
    learner.learn([(1, event("u1", "i0", at=T0)), (2, event("u1", "i2", at=T0 + 100))])
    exported = export_learner(learner, parent_version=None)
    matrix = np.load(io.BytesIO(exported.files[ITEM_EMBEDDINGS]))
    ids = json.loads(exported.files[ITEM_IDS])
    untouched = matrix[ids.index("i1")]
    expected = learner.model.content_vectors(
        learner.model.item_categories[[learner.items.get("i1")]],
        learner.model.item_tags[[learner.items.get("i1")]],
        learner.model.item_text[[learner.items.get("i1")]],
    )[0]
    assert np.abs(untouched - expected.detach().numpy()).max() < 1e-5
    assert not torch.equal(learner.model.item_text[learner.items.get("i1")], torch.zeros(text.TEXT_DIM))


def test_without_the_extra_the_trainer_uses_categories_and_tags_only(monkeypatch) -> None:
    monkeypatch.setattr(text, "text_extra_installed", lambda: False)
    learner, encoder = server.build_learner(TrainerSettings(text_features="auto", dim=16, max_history=10))
    assert encoder is None and learner.config.model.text_dim == 0
    learner.add_items([(1, catalogue_item("x", ["drama"], ["slow"], title="A title nobody embeds"))])
    learner.learn([(1, event("u1", "x", at=T0))])
    assert export_learner(learner, parent_version=None).manifest["model"]["dim"] == 16
    with pytest.raises(RuntimeError, match="text"):
        text.make_text_encoder("on")

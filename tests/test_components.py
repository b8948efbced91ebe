"""Whether a prediction keeps only its largest component is decided by the support labels' shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monailabel_metaapp.core.adaptation import (
    COMPONENT_KEY,
    ONE_PIECE,
    Head,
    SegAdapter,
    largest_component_share,
    probabilities_to_labels,
)
from monailabel_metaapp.core.networks import FewShotSegModel, SegModelConfig

SMALL = SegModelConfig(size=64, features=(8, 8, 16, 16, 32, 8), emb=8)


def _blobs(corners: list[tuple[int, int]], side: int = 10) -> torch.Tensor:
    m = torch.zeros(4, 64, 64, dtype=torch.bool)
    for y, x in corners:
        m[:, y : y + side, x : x + side] = True
    return m


def test_scattered_support_labels_keep_every_piece_of_the_prediction():
    organ, csf_like = _blobs([(20, 20)], side=24), _blobs([(2, 2), (2, 50), (50, 2), (50, 50)])
    assert largest_component_share([organ]) == 1.0
    assert largest_component_share([csf_like]) == 0.25 < ONE_PIECE

    adapter = SegAdapter(FewShotSegModel(SMALL), steps=2)
    stack = torch.rand(4, 64, 64)
    assert adapter.adapt([stack], [organ]).one_piece
    scattered = adapter.adapt([stack], [csf_like])
    assert not scattered.one_piece and float(scattered.state_dict()[COMPONENT_KEY]) == 0.25
    assert Head(params={}, n_labels=1, seconds=0.0).one_piece, "heads stored before the rule keep the old step"

    probs = np.zeros((2, 4, 64, 64), np.float32)
    probs[:, :, 2:12, 2:12] = 0.9  # two pieces for each of two structures, the second one larger
    probs[:, :, 40:60, 40:60] = 0.8
    out = probabilities_to_labels(probs[:1], [5], one_piece=True)
    assert (out[:, 5, 5] == 0).all() and (out[:, 50, 50] == 5).all(), "one piece: the largest is kept"
    out = probabilities_to_labels(probs[:1], [5], one_piece=False)
    assert (out[:, 5, 5] == 5).all() and (out[:, 50, 50] == 5).all(), "scattered: every piece is kept"
    probs[1] = np.roll(probs[1], 20, axis=1)  # the second structure elsewhere
    out = probabilities_to_labels(probs, [5, 6], one_piece=[True, False])
    assert (out[:, 5, 5] == 0).all() and (out[:, 25, 5] == 6).all() and (out[:, 60, 50] == 6).all()


def test_label_values_beyond_8_bits_are_refused_not_wrapped():
    """A source label value such as 500 would wrap to 244 in the 8-bit label map: refuse it."""
    probs = np.full((2, 2, 4, 4), 0.9, np.float32)
    assert probabilities_to_labels(probs, [1, 255]).max() in (1, 255)
    with pytest.raises(ValueError, match="1-255"):
        probabilities_to_labels(probs, [200, 500])

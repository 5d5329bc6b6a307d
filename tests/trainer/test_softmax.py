"""The fused softmax loss gives F.cross_entropy's values and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.trainer.softmax import IGNORED, softmax_losses


def test_losses_and_gradients_equal_cross_entropy_with_ignored_targets() -> None:
    torch.manual_seed(0)
    hs = (3 * torch.randn(40, 16)).requires_grad_()
    vectors = torch.randn(90, 16).requires_grad_()
    target = torch.randint(0, 90, (40,))
    target[[3, 17]] = IGNORED
    weights = torch.rand(40)
    results = []
    for loss_of in (
        lambda: F.cross_entropy(hs @ vectors.T, target, reduction="none", ignore_index=IGNORED),
        lambda: softmax_losses(hs, vectors, target),
    ):
        hs.grad = vectors.grad = None
        losses = loss_of()
        (losses * weights).sum().backward()
        assert hs.grad is not None and vectors.grad is not None
        results.append((losses.detach(), hs.grad.clone(), vectors.grad.clone()))
    reference, fused = results
    assert fused[0][3] == 0 and fused[0][17] == 0 and fused[0].min() >= 0
    assert fused[1][3].abs().sum() == 0  # an ignored target moves nothing
    for a, b in zip(reference, fused, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_no_targets_is_a_zero_loss() -> None:
    assert softmax_losses(torch.zeros(0, 4), torch.zeros(3, 4), torch.zeros(0, dtype=torch.long)).shape == (
        0,
    )

"""The losses beside the model: the fused cross-entropy + z-loss (the chunked one is tested through the model in
test_model.py, and z-loss through the model in test_optim.py)."""
from __future__ import annotations

import pytest
import torch

from codeparrot.losses import cross_entropy_with_z_loss


def test_fused_z_loss_skips_ignored_targets_in_value_and_gradient():
    """The fused cross-entropy + z-loss equals autograd through the textbook formula, with -100 targets left out."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(12, 17)).requires_grad_()
    targets = torch.randint(0, 17, (12,))
    targets[[1, 5, 6]] = -100
    got = cross_entropy_with_z_loss(logits, targets, 0.3)
    (grad,) = torch.autograd.grad(2.0 * got, logits)
    keep = targets != -100
    want = (torch.nn.functional.cross_entropy(logits[keep], targets[keep])
            + 0.3 * logits[keep].logsumexp(-1).square().mean())
    (want_grad,) = torch.autograd.grad(2.0 * want, logits)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(grad, want_grad)
    assert grad[~keep].abs().max() == 0

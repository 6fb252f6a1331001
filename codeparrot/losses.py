"""The next-token losses beside the model: cross-entropy plus z-loss in one pass, and a chunked linear
cross-entropy that never holds the whole [N, V] logits (the forward computes the gradients, as Liger's does)."""
from __future__ import annotations

import torch


class _CrossEntropyZLoss(torch.autograd.Function):
    """Mean cross-entropy of fp32 logits [N, V] against targets [N] (ignore_index -100) plus z * mean log(Z)^2.

    One logsumexp serves both terms (CE = lse - logit[target]) and the backward is one in-place softmax, as
    F.cross_entropy's is: autograd through logsumexp, gather and square made z-loss cost 1.2x a tiny model's step.
    """

    @staticmethod
    def forward(ctx, logits, targets, z_loss: float):
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        tgt = targets.clamp(min=0)
        lse = logits.logsumexp(-1)  # [N]
        loss = ((lse - logits.gather(1, tgt[:, None]).squeeze(1) + z_loss * lse.square()) * valid).sum() / n_valid
        ctx.save_for_backward(logits, tgt, valid, lse, n_valid)
        ctx.z_loss = z_loss
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        logits, tgt, valid, lse, n_valid = ctx.saved_tensors
        dlogits = (logits - lse[:, None]).exp_()  # softmax; d(lse)/dlogits
        dlogits *= (1 + 2 * ctx.z_loss * lse)[:, None]  # d(z lse^2) = 2 z lse softmax
        dlogits[torch.arange(tgt.size(0), device=tgt.device), tgt] -= 1.0
        dlogits *= (valid / n_valid * grad_out)[:, None]
        return dlogits, None, None


def cross_entropy_with_z_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] against targets [N] (ignore_index -100) plus `z_loss` times the mean
    log(Z)^2 (PaLM's auxiliary loss: keeps the softmax normaliser near 1, where bf16 logits stay precise)."""
    return _CrossEntropyZLoss.apply(logits, targets, z_loss)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ W[:V].T) against targets, computed a chunk of rows at a time.

    The gradients are computed during the forward pass (as Liger's fused linear cross-entropy does), so neither
    the [N, V] logits nor their fp32 copy ever exist whole, and no chunk is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, chunk_size: int, grad_enabled: bool, z_loss: float):
        # h [N, C], weight [Vp, C], targets [N]
        w = weight[:vocab_size]  # [V, C]
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        # needs_input_grad is set under no_grad too (weight.requires_grad), so evaluation asks explicitly
        want_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_h = torch.zeros_like(h) if want_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), chunk_size):
            hc, tc, vc = h[start:start + chunk_size], targets[start:start + chunk_size], valid[start:start + chunk_size]
            logits = (hc @ w.t()).float()  # [n, V], fp32 only for this chunk
            lse = logits.logsumexp(dim=-1)  # [n]
            tgt = tc.clamp(min=0)
            total += ((lse - logits.gather(1, tgt[:, None]).squeeze(1)) * vc).sum()
            if z_loss > 0:
                total += z_loss * (lse.square() * vc).sum()
            if want_grad:
                dlogits = (logits - lse[:, None]).exp_()  # softmax, in place
                if z_loss > 0:  # d(z * lse^2)/dlogits = 2 z lse softmax
                    dlogits *= (1 + 2 * z_loss * lse)[:, None]
                dlogits[torch.arange(tgt.size(0), device=tgt.device), tgt] -= 1.0
                dlogits *= vc[:, None] / n_valid
                dlogits = dlogits.to(hc.dtype)
                grad_h[start:start + chunk_size] = dlogits @ w
                grad_w[:vocab_size] += dlogits.t() @ hc
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          chunk_size: int, z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token loss of hidden states `h` [N, C] through the LM head `weight` [Vp, C]; ignore_index -100;
    plus `z_loss` times the mean log(Z)^2."""
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets, vocab_size, chunk_size, torch.is_grad_enabled(),
                                            z_loss)

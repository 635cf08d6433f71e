"""Gradient-norm clipping over dense and row-sparse gradients.

    total = clip_grad_norm(params, max_norm)     # 0-d tensor, the norm before clipping

torch.nn.utils.clip_grad_norm_ cannot take the sparse COO gradient of an `nn.Embedding(sparse=True)`
(training.sparse_embedding_grad). Dense gradients go through torch's own get_total_norm /
clip_grads_with_norm_, so a run without sparse gradients clips exactly as clip_grad_norm_ does.
A sparse gradient is coalesced in place first (rows of repeated tokens summed; the optimizer would
coalesce it anyway), then its values count in the same 2-norm and are scaled by the same factor.
"""
from __future__ import annotations

import torch


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Scale every gradient so that their joint 2-norm is at most max_norm; returns the norm."""
    params = [p for p in params if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    dense = [p for p in params if not p.grad.is_sparse]
    norms = []
    for p in sparse:
        p.grad = p.grad.coalesce()
        norms.append(torch.linalg.vector_norm(p.grad._values(), dtype=torch.float32))
    if dense:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in dense]).float())
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    if max_norm == float("inf"):
        return total
    if dense:
        torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in sparse:
        values = p.grad._values()
        values.mul_(coef.to(values.dtype))
    return total

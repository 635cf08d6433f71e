"""The lm_head gradient of the fused loss, computed at the end of the backward.

    deferred = DeferredWeightGrad()
    h = deferred.attach(embed(input_ids))      # must require grad, else nothing triggers it
    loss = fused_linear_cross_entropy(body(h), W, labels, deferred=deferred)
    loss.backward()                            # W.grad arrives after every layer's backward

kernels/fused_linear_cross_entropy.py computes dW = G^T X chunk by chunk in the loss's forward, so
the [V, H] gradient lives through the whole backward of the layers beside their activations (a
Llama-8B at 2 x 2048 tokens: 0.98 GiB in bf16 at the step's peak). Deferred, the forward computes
only the loss and dX and keeps X [N, H] and the labels; `attach` puts an identity node on the
decoder's input whose backward (the last one before the embedding's: every layer's backward comes
first) recomputes each chunk's logits and G and accumulates G^T X into weight.grad, scaled by the
loss's incoming gradient.

Cost: one more lm_head GEMM and CE pass (3 GEMMs -> 4 per chunk). This pass holds at most 128 MiB
of logits a chunk (512 rows at V=128256) instead of the forward's 512 MiB, since it runs beside
the new gradient; with the forward's chunking (small inputs) the result is bit for bit the same,
else dW sums the same products in smaller chunks (bf16 accumulation order only).
"""
from __future__ import annotations

import torch

from .fused_linear_cross_entropy import (FusedLinearCrossEntropyOptions, default_chunk_rows,
                                         fused_linear_cross_entropy_forward)

_DEFERRED_CHUNK_BYTES = 128 * 1024 * 1024


class DeferredWeightGrad:
    """What the fused loss's forward recorded (X, W, labels, options) and its backward's incoming
    gradient; `compute` turns them into W.grad once."""

    def __init__(self):
        self.saved = None
        self.grad_loss = None

    def record(self, hidden, weight, labels, opts) -> None:
        self.saved = (hidden, weight, labels, opts)

    def attach(self, tensor: torch.Tensor) -> torch.Tensor:
        """Identity on `tensor` (which must require grad) whose backward runs `compute`."""
        return _RunDeferred.apply(tensor, self)

    def compute(self) -> None:
        """Accumulate dW into weight.grad (once); nothing when the loss had no backward."""
        if self.saved is None or self.grad_loss is None:
            return
        hidden, weight, labels, opts = self.saved
        self.saved = None
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            # Smaller chunks than the forward's: this pass runs at the end of the backward, beside
            # the new [V, H] gradient, where a 512 MiB logits chunk would set the step's peak.
            rows = min(opts.chunk_rows, default_chunk_rows(hidden.shape[0], weight.shape[0],
                                                           hidden.element_size(), _DEFERRED_CHUNK_BYTES))
            forward_opts = FusedLinearCrossEntropyOptions(
                lora_scaling=opts.lora_scaling, ignore_index=opts.ignore_index,
                chunk_rows=rows, triton=opts.triton, compute_grad=True)
            _, grads = fused_linear_cross_entropy_forward(hidden, weight, labels, None, None,
                                                          forward_opts, needs=(False, True, False, False))
            dw = grads[1].mul_(self.grad_loss.to(grads[1].dtype))
            if weight.grad is None:
                weight.grad = dw
            else:
                weight.grad.add_(dw)
        self.grad_loss = None


class _RunDeferred(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, deferred):
        ctx.deferred = deferred
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.deferred.compute()
        return grad, None

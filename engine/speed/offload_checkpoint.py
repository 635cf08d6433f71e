"""Gradient checkpointing whose saved layer inputs wait for the backward in host memory.

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n = enable_offloaded_checkpointing(model)     # decoder layers switched (a PeftModel is fine)
    offload_stats(model).last_forward_bytes       # bytes the last forward kept on the host
    disable_offloaded_checkpointing(model)        # back to transformers' checkpoint function

With gradient checkpointing a decoder layer keeps only its input hidden state [B, S, H] for the
recompute; on a Llama-8B at 2 x 2048 tokens in bf16 that is 32 layers x 32 MiB = 1 GiB of GPU
memory. Here each checkpointed layer (a transformers GradientCheckpointingLayer) runs through a
reentrant-style autograd Function instead of torch.utils.checkpoint:

- forward: the layer runs without grad; its input is copied to a pinned host buffer (PyTorch's
  caching host allocator reuses those between steps) by a non-blocking device-to-host copy on a
  side stream that first waits for the compute stream, so the copy overlaps the next layers.
  `record_stream` keeps the GPU block from being reused before the copy has read it.
- backward: the layer's input comes back to the GPU, re-runs under the forward's autocast and RNG
  states (as torch.utils.checkpoint's reentrant version does, so LoRA dropout draws the same
  mask) and is backpropagated through. The host-to-device copy of the layer before it (the next
  to go backward, linked in the forward) is started on the side stream as this backward begins,
  so it overlaps this layer's recompute and backward instead of waiting on the compute stream
  (on an H200, 32 x 0.63 ms a P1 step that were on the critical path). That holds one more layer
  input on the GPU during a layer's backward.

Cost: one D2H copy per layer in forward and one H2D copy per layer in backward (both overlapped
with compute, except the first layer's fetch), plus B x S x H x element-size bytes of pinned host
memory per layer. Saved: the same bytes of GPU memory, less the one prefetched input.
Measured on an H200 before the prefetch (torch 2.11, transformers 5.17; 8 Llama-8B-shaped layers,
2 x 2048 tokens, bf16 stream): 139.4 -> 143.3 ms/step (+2.8%), memory after the forward -256 MiB
(8 x 32 MiB), peak -157 MiB (the peak is in the backward, where the recomputed layer's input is
back on the GPU). On a CPU device the "host
copy" is a clone, so CPU runs exercise the same code path but save nothing.

With a frozen embedding, transformers' `enable_input_require_grads` hook (set by
gradient_checkpointing_enable for peft models) makes the embedding output a leaf that autograd
keeps on the GPU whatever we do: one layer input. The dummy input below makes that hook
unnecessary here (`disable_input_require_grads()` removes it).

It does nothing (calls the layer's previous checkpoint function, normally
torch.utils.checkpoint.checkpoint(use_reentrant=False)) when the call is not the simple case: no
positional floating hidden state, another positional argument or a keyword argument that is a
tensor requiring grad, a device other than cuda/cpu. Without grad enabled the layer just runs.

Like every reentrant checkpoint, the recompute's gradients are accumulated into `.grad` by an
inner backward: `torch.autograd.grad(loss, params)` does not see them, use `loss.backward()`.

The layer switch relies on how transformers' GradientCheckpointingLayer calls its checkpoint
function: `_gradient_checkpointing_func(partial(forward, **kwargs), *args)`, the hidden state first
(`__call__` up to 5.22, the subclass' forward from 5.23). When that class is not a version
engine/speed/upstream.py knows, nothing is switched: transformers' own (non-offloaded) checkpointing
runs, with one warning in the log.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import upstream

log = logging.getLogger(__name__)

_STATE_ATTR = "_cpt_offload_checkpoint"
_side_streams: dict[int, Any] = {}   # cuda device index -> side stream for the host copies


class Recompute:
    """Whether an offloaded layer's forward is being re-run for its backward.

    One object per model, handed explicitly to its offloaded checkpoints (which count the recomputes
    they run) and to the patched MLP forwards (engine/speed/patching.py: the recompute's output is
    only backpropagated through, never read, so the last projection's value can be skipped).
    The backward runs while the training thread waits for it, so no other forward sees the flag.
    """

    def __init__(self):
        self.depth = 0

    @property
    def active(self) -> bool:
        return self.depth > 0

    @contextlib.contextmanager
    def running(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


@dataclass
class OffloadStats:
    """What the offloaded checkpoints of one model copied to host memory.

    `per_layer` maps each switched layer's module name to the bytes its most recent checkpointed
    forward copied (0 when that call fell back), so `last_forward_bytes` is what the latest forward
    through the model holds on the host, with no reset needed between steps. `total_bytes` and
    `calls` add up every offloaded call since enable; `fallbacks` counts calls that went to the
    previous checkpoint function.
    """

    per_layer: dict[str, int] = field(default_factory=dict)
    total_bytes: int = 0
    calls: int = 0
    fallbacks: int = 0

    @property
    def last_forward_bytes(self) -> int:
        return sum(self.per_layer.values())


@dataclass
class _ModelState:
    stats: OffloadStats
    layers: list = field(default_factory=list)   # (module, _LayerCheckpoint)
    recompute: Recompute = field(default_factory=Recompute)
    chain: _ForwardChain = field(default_factory=lambda: _ForwardChain())


class _ForwardChain:
    """The host copy the previous offloaded layer of a model made, to link the next one to it."""

    def __init__(self):
        self.last_index = -2
        self.last_copy = None   # weakref to a _HostCopy: a dropped graph frees its copies

    def link(self, index: int) -> "_HostCopy | None":
        """The copy of the layer just before `index` in this forward, if it is still alive."""
        if self.last_copy is None or self.last_index != index - 1:
            return None
        return self.last_copy()

    def record(self, index: int, copy: "_HostCopy") -> None:
        self.last_index, self.last_copy = index, weakref.ref(copy)


class _LayerCheckpoint:
    """The `_gradient_checkpointing_func` of one layer: fn(*args) offloaded, or the previous func."""

    def __init__(self, name: str, previous: Callable, stats: OffloadStats, index: int = 0,
                 chain: _ForwardChain | None = None, recompute: Recompute | None = None):
        self.name = name
        self.previous = previous
        self.stats = stats
        self.index = index                  # position among the model's switched layers
        self.chain = chain or _ForwardChain()
        self.recompute = recompute or Recompute()
        self.dummy = torch.empty(0, requires_grad=True)   # makes the output require grad

    def __call__(self, fn: Callable, *args):
        if not torch.is_grad_enabled():
            return fn(*args)
        if not _simple_case(fn, args):
            self.stats.fallbacks += 1
            self.stats.per_layer[self.name] = 0
            return self.previous(fn, *args)
        hidden = args[0]
        nbytes = hidden.numel() * hidden.element_size()
        self.stats.per_layer[self.name] = nbytes
        self.stats.total_bytes += nbytes
        self.stats.calls += 1
        # Issued before the layer runs, so the device-to-host copy overlaps this layer's compute.
        copy = _HostCopy(hidden, self.chain.link(self.index))
        self.chain.record(self.index, copy)
        return _OffloadedCheckpoint.apply(fn, len(args) - 1, copy, self.recompute, self.dummy, *args)


def _requires_grad(value) -> bool:
    if torch.is_tensor(value):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_requires_grad(v) for v in value.values())
    return False


def _simple_case(fn: Callable, args: tuple) -> bool:
    """The layer input is the first positional floating tensor and no other input needs grad."""
    if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
        return False
    if args[0].device.type not in ("cuda", "cpu"):
        return False
    if any(_requires_grad(a) for a in args[1:]):
        return False
    # transformers passes the keyword arguments in a functools.partial: a tensor there that needs
    # grad would be backpropagated through by the inner backward, twice with the outer one.
    while isinstance(fn, functools.partial):
        if _requires_grad(fn.args) or _requires_grad(fn.keywords):
            return False
        fn = fn.func
    return True


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


class _HostCopy:
    """One layer input in host memory, and its way back to the GPU.

    `fetch` returns it on the device: the copy `prefetch` started on the side stream when the
    backward of the layer after it began (so it overlapped that layer's recompute and backward),
    else a copy made now on the compute stream.
    """

    __slots__ = ("host", "event", "device_copy", "device_event", "previous", "__weakref__")

    def __init__(self, hidden: torch.Tensor, previous: "_HostCopy | None"):
        hidden = hidden.detach()
        self.device_copy = self.device_event = None
        self.previous = previous          # the layer before this one in the same forward
        if hidden.device.type != "cuda":
            self.host, self.event = hidden.clone(), None
            return
        side = _side_stream(hidden.device)
        self.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        side.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(side):
            self.host.copy_(hidden, non_blocking=True)
        hidden.record_stream(side)   # the allocator may not hand this block out before the copy read it
        self.event = torch.cuda.Event()
        self.event.record(side)

    def prefetch(self, device: torch.device) -> None:
        """Start the host-to-device copy on the side stream (CUDA; once; no-op once fetched)."""
        if self.host is None or self.event is None or self.device_copy is not None:
            return
        compute, side = torch.cuda.current_stream(device), _side_stream(device)
        # Allocated from the compute stream's pool (a side-stream allocation kept its own pool:
        # +1.26 GiB reserved on P1), so the side stream first waits for the compute stream's work
        # queued so far: the block may have been freed by a kernel still running there.
        self.device_copy = torch.empty(self.host.shape, dtype=self.host.dtype, device=device)
        side.wait_stream(compute)
        side.wait_event(self.event)
        with torch.cuda.stream(side):
            self.device_copy.copy_(self.host, non_blocking=True)
        self.device_copy.record_stream(side)
        self.device_event = torch.cuda.Event()
        self.device_event.record(side)

    def fetch(self, device: torch.device) -> torch.Tensor:
        if self.device_copy is not None:
            torch.cuda.current_stream(device).wait_event(self.device_event)
            hidden = self.device_copy
        else:
            if self.event is not None:
                torch.cuda.current_stream(device).wait_event(self.event)
            hidden = self.host.to(device, non_blocking=True)
        self.host = self.event = self.device_copy = self.device_event = self.previous = None
        return hidden


def _autocast_state(device_type: str) -> dict:
    return {"enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type),
            "cache_enabled": torch.is_autocast_cache_enabled()}


class _OffloadedCheckpoint(torch.autograd.Function):
    """Reentrant checkpoint of fn(hidden, *rest) whose saved `hidden` lives in host memory.

    Inputs: fn, n_rest, copy (the _HostCopy of hidden), recompute (counts the re-run), dummy (0-element, requires grad: the
    output needs grad even when hidden does not, e.g. a frozen embedding with LoRA layers),
    hidden, *rest (no grad, checked before).
    """

    @staticmethod
    def forward(ctx, fn, n_rest, copy, recompute, dummy, hidden, *rest):
        device = hidden.device
        ctx.fn, ctx.recompute = fn, recompute
        ctx.device = device
        ctx.hidden_meta = (hidden.dtype, hidden.shape)
        ctx.tensor_rest = [torch.is_tensor(r) for r in rest]
        ctx.save_for_backward(*[r for r in rest if torch.is_tensor(r)])
        ctx.other_rest = [r for r in rest if not torch.is_tensor(r)]
        ctx.autocast = _autocast_state(device.type)
        ctx.cpu_autocast = _autocast_state("cpu")
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.set_materialize_grads(False)
        ctx.copy = copy
        with torch.no_grad():
            outputs = fn(hidden, *rest)
        if not (torch.is_tensor(outputs) or isinstance(outputs, tuple)):
            raise TypeError(f"offloaded checkpointing expects a layer to return a tensor or a tuple, "
                            f"got {type(outputs).__name__}; disable offload_checkpointing")
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        device = ctx.device
        copy, ctx.copy = ctx.copy, None
        previous = copy.previous
        hidden = copy.fetch(device)
        if previous is not None:   # the next layer to go backward: its input comes back meanwhile
            previous.prefetch(device)
        hidden.requires_grad_(ctx.needs_input_grad[5])
        saved, others = iter(ctx.saved_tensors), iter(ctx.other_rest)
        rest = [next(saved) if is_tensor else next(others) for is_tensor in ctx.tensor_rest]

        cuda = device.type == "cuda"
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if cuda else []
        with torch.random.fork_rng(devices=rng_devices, enabled=True):
            torch.set_rng_state(ctx.cpu_rng)
            if cuda:
                torch.cuda.set_rng_state(ctx.cuda_rng, device)
            with torch.enable_grad(), torch.autocast(device.type, **ctx.autocast):
                with ctx.recompute.running():
                    if cuda:
                        with torch.autocast("cpu", **ctx.cpu_autocast):
                            outputs = ctx.fn(hidden, *rest)
                    else:
                        outputs = ctx.fn(hidden, *rest)

        outputs = (outputs,) if torch.is_tensor(outputs) else outputs
        pairs = [(out, grad) for out, grad in zip(outputs, grads)
                 if torch.is_tensor(out) and out.requires_grad and grad is not None]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        hidden_grad = hidden.grad if ctx.needs_input_grad[5] else None
        return (None, None, None, None, None, hidden_grad) + (None,) * len(rest)


def _checkpoint_layers(model: nn.Module):
    from transformers.modeling_layers import GradientCheckpointingLayer

    for name, module in model.named_modules():
        if (isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing
                and callable(getattr(module, "_gradient_checkpointing_func", None))):
            yield name, module


def _state_owner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_offloaded_checkpointing(model: nn.Module, recompute: Recompute | None = None) -> int:
    """Switch every checkpointed decoder layer of `model` to the host-offloaded checkpoint.

    Call after `model.gradient_checkpointing_enable(...)`; a second call only switches layers
    that transformers' function was set on again. Returns the number of layers now offloaded
    (0 when gradient checkpointing is off, or when transformers' GradientCheckpointingLayer is not
    a version engine/speed/upstream.py knows: the layers keep transformers' checkpointing).
    `recompute` is told while a layer re-runs for its backward (the registry's Surgery.recompute).
    """
    if any(True for _ in _checkpoint_layers(model)) and library_code_changed():
        return 0
    owner = _state_owner(model)
    state = getattr(owner, _STATE_ATTR, None)
    if state is None:
        state = _ModelState(OffloadStats(), recompute=recompute or Recompute())
    switched = 0
    for name, module in _checkpoint_layers(model):
        current = module._gradient_checkpointing_func
        if not (isinstance(current, _LayerCheckpoint) and current.stats is state.stats):
            func = _LayerCheckpoint(name, current, state.stats, switched, state.chain, state.recompute)
            module._gradient_checkpointing_func = func
            state.layers.append((module, func))
        switched += 1
    if switched:
        setattr(owner, _STATE_ATTR, state)
        log.info("checkpointed layer inputs of %d layers go to host memory", switched)
    return switched


def library_code_changed() -> str | None:
    """Why transformers' GradientCheckpointingLayer is not the one this module was written for
    (upstream.check's reason, logged once), or None."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return upstream.check("GradientCheckpointingLayer", GradientCheckpointingLayer)


def disable_offloaded_checkpointing(model: nn.Module) -> int:
    """Give each switched layer its previous checkpoint function back. Returns how many."""
    owner = _state_owner(model)
    state = getattr(owner, _STATE_ATTR, None)
    if state is None:
        return 0
    restored = 0
    for module, func in state.layers:
        if module.__dict__.get("_gradient_checkpointing_func") is func:   # not replaced since
            module._gradient_checkpointing_func = func.previous
            restored += 1
    delattr(owner, _STATE_ATTR)
    return restored


def offload_stats(model: nn.Module) -> OffloadStats | None:
    """The byte counters of an offloaded model (None when it is not enabled)."""
    state = getattr(_state_owner(model), _STATE_ATTR, None)
    return state.stats if state is not None else None


def apply_offloaded_checkpointing(model: nn.Module, surgery) -> None:
    """The registry's offload_checkpoints transform: the layers tell surgery.recompute when they
    re-run; undone by disable_offloaded_checkpointing."""
    n = enable_offloaded_checkpointing(model, surgery.recompute)
    if n:
        surgery.on_undo(lambda: disable_offloaded_checkpointing(model))
        surgery.count(n)
    elif any(True for _ in _checkpoint_layers(model)):
        surgery.noted(library_code_changed())
    else:
        surgery.note("layer inputs stay on the device: gradient checkpointing is off")

"""Our RoPE kernel in the attention modules of a loaded model, per module instance.

    forwards, left = rope_forwards(model, ("Llama", "Qwen3"), backend="auto")
    # forwards: [(attention module, function to bind as its forward)]; left: {reason: count}

The functions bound are the reviewed copies of transformers' attention forwards in
engine/speed/attention_forwards.py, which rotate q and k with kernels.apply_rope where upstream
calls apply_rotary_pos_emb. A copy replaces a class' forward only when both hold:

- the forward (of the class in the module's MRO that defines it) is LlamaAttention,
  MistralAttention, Qwen2Attention or Qwen3Attention.forward with a fingerprint listed in
  engine/speed/upstream.py KNOWN["<class>.forward"]: the code the copy was written from. The
  fingerprint also picks the copy (attention_forwards.REVIEWED: the KV cache API changed in 5.24);
- apply_rotary_pos_emb in the class' modeling module, and the rotate_half it calls, are known
  versions: the kernel computes q cos + rotate_half(q) sin with rotate_half = cat(-x2, x1) over
  the halves of the head dimension, and unsqueeze_dim=1, as they do. With the `kernels` package
  installed (0.19 with transformers 5.25 here) apply_rotary_pos_emb is a kernels Func module;
  the function inside it is checked (upstream.unwrap_hub_func).

A changed upstream function leaves the modules on transformers' forward with upstream.check's
reason ("RoPE kernel off: transformers X changed LlamaAttention.forward (fingerprint ...)", logged
once, starting with ROPE_OFF); a class we have no copy for (a subclass that overrides forward) is
left with a reason of its own. Nothing is rebuilt from transformers' code or globals at run time;
engine/speed/patching.py binds the forwards on the instances and undoes them on revert.
"""
from __future__ import annotations

import sys
from typing import Callable

from torch import nn

from . import upstream
from .attention_forwards import REVIEWED, attention_forward

_ROPE_GLOBAL = "apply_rotary_pos_emb"   # the function our copies stand in for
ROPE_OFF = upstream.KNOWN[_ROPE_GLOBAL].off + " off:"   # how an upstream.check reason starts


def rope_forwards(model: nn.Module, class_prefixes: tuple[str, ...], backend: str):
    """([(module, forward)], {reason: modules left}) for the model's *Attention modules whose class
    name starts with one of class_prefixes. Each class is checked once."""
    chosen: dict[type, Callable | str] = {}   # class -> our forward, or why there is none
    forwards, left = [], {}
    for module in model.modules():
        cls = type(module)
        if not (cls.__name__.startswith(class_prefixes) and cls.__name__.endswith("Attention")):
            continue
        if cls not in chosen:
            chosen[cls] = _forward_for(cls, backend)
        forward = chosen[cls]
        if isinstance(forward, str):
            left[forward] = left.get(forward, 0) + 1
        else:
            forwards.append((module, forward))
    return forwards, left


def _forward_for(cls: type, backend: str) -> Callable | str:
    """Our forward for modules of `cls`, or the one-line reason they keep transformers'."""
    owner = next((c for c in cls.__mro__ if "forward" in c.__dict__), None)
    if owner is None or owner.__name__ not in REVIEWED:
        where = owner.__qualname__ if owner is not None else cls.__qualname__
        return f"{where}.forward has no reviewed copy with our RoPE kernel"
    forward = owner.__dict__["forward"]
    reason = upstream.check(f"{owner.__name__}.forward", forward)
    if reason:
        return reason
    modeling = sys.modules[owner.__module__]
    reason = _rope_reason(modeling)
    if reason:
        return reason
    release = REVIEWED[owner.__name__].get(upstream.fingerprint(forward))
    if release is None:   # in KNOWN, not in REVIEWED: tests/engine/test_rope.py keeps them equal
        return f"{owner.__qualname__}.forward is known but has no copy in attention_forwards.REVIEWED"
    return attention_forward(owner.__name__, release, modeling, backend)


def _rope_reason(modeling) -> str | None:
    """None when the modeling module's apply_rotary_pos_emb and its rotate_half are versions
    engine/speed/upstream.py knows (the rotation the kernel computes); else the reason."""
    original = getattr(modeling, _ROPE_GLOBAL, None)
    if original is None:
        return f"{modeling.__name__} has no {_ROPE_GLOBAL}"
    try:
        fn = upstream.unwrap_hub_func(original)
    except ValueError as exc:
        return upstream.warn_once(f"{ROPE_OFF} {exc}")
    # a known apply_rotary_pos_emb calls rotate_half from its module's globals
    return upstream.check(_ROPE_GLOBAL, fn) or upstream.check(
        "rotate_half", getattr(fn, "__globals__", {}).get("rotate_half"))

"""Our RoPE kernel inside transformers' own attention forwards, per module instance.

    forwards, left = rope_forwards(model, ("Llama", "Qwen3"), backend="auto")
    # forwards: [(attention module, function to bind as its forward)]; left: {reason: count}

transformers' attention forward (Llama, Mistral, Qwen2, Qwen3) calls `apply_rotary_pos_emb` from
its modeling module's globals. The copy made here has the same code, defaults and closure, and a
shallow copy of those globals with `apply_rotary_pos_emb` swapped for a stand-in that runs
kernels.apply_rope; decorators made with functools.wraps (deprecate_kwarg) are copied around it.
Cache, sliding windows, q/k norms and the attention interface stay the installed version's code.
The globals are a snapshot taken now: rebinding a name in the modeling module later is not seen
by the copies. A forward that does not call `apply_rotary_pos_emb` from its globals, or one
with parameters other than (q, k, cos, sin[, position_ids][, unsqueeze_dim]), is left as it is,
with the reason. engine/speed/patching.py binds the copies (and undoes them on revert).

The kernel computes q cos + rotate_half(q) sin with rotate_half = cat(-x2, x1) over the halves of
the head dimension. So the `apply_rotary_pos_emb` found, and the `rotate_half` of its own globals,
must be versions engine/speed/upstream.py knows; otherwise the attention stays transformers' with the
reason "RoPE kernel off: transformers X changed ...". With the `kernels` package installed (0.19
with transformers 5.25 here), the modeling module holds `apply_rotary_pos_emb` as a kernels Func
module (`use_kernel_forward_from_hub("rotary_pos_emb")`): the function inside it is checked and
stood in for (upstream.unwrap_hub_func); the attention class' `use_kernelized_func` wrapper around
forward is a functools.wraps decorator, copied like the others. The stand-in replaces the whole
call, so neither a hub kernel nor the Func's dispatch runs in a patched attention.
"""
from __future__ import annotations

import inspect
import types
from typing import Callable

import torch
from torch import nn

from . import upstream

_ROPE_GLOBAL = "apply_rotary_pos_emb"  # the global transformers' attention forwards call
_ROPE_ARGS = ("q", "k", "cos", "sin")
ROPE_OFF = upstream.KNOWN[_ROPE_GLOBAL].off + " off:"   # how an upstream.check reason starts


def rope_forwards(model: nn.Module, class_prefixes: tuple[str, ...], backend: str):
    """([(module, forward copy)], {reason: modules left}) for the model's attention modules.

    One copy per attention class (its globals dict is copied once).
    """
    copies: dict[Callable, Callable | str] = {}  # class forward -> our copy, or why there is none
    forwards, left = [], {}
    for module in model.modules():
        name = type(module).__name__
        if not (name.startswith(class_prefixes) and name.endswith("Attention")):
            continue
        forward = type(module).forward
        if forward not in copies:
            try:
                copies[forward] = _forward_with_rope_kernel(forward, backend)
            except NoRopeHook as exc:
                copies[forward] = str(exc)
        copy = copies[forward]
        if isinstance(copy, str):
            left[copy] = left.get(copy, 0) + 1
        else:
            forwards.append((module, copy))
    return forwards, left


class NoRopeHook(Exception):
    """Why an attention forward cannot take our RoPE function (its modules stay transformers')."""


def _forward_with_rope_kernel(forward, backend: str) -> types.FunctionType:
    """A copy of `forward` in which the global apply_rotary_pos_emb is kernels.apply_rope.

    The function that calls apply_rotary_pos_emb gets a shallow copy of its globals with our
    stand-in; each functools.wraps decorator above it (found through __wrapped__) is copied with
    its closure cell pointing at the copy below, so what the decorator does still happens.

    Raises:
        NoRopeHook: no function in the chain calls apply_rotary_pos_emb from its globals, a
            decorator does not hold the function it wraps in its closure, the original
            apply_rotary_pos_emb (or its rotate_half) is not a version engine/speed/upstream.py knows,
            or it has parameters the kernel does not take.
    """
    if not isinstance(forward, types.FunctionType):
        raise NoRopeHook(f"forward is a {type(forward).__name__}, not a Python function")
    if _ROPE_GLOBAL in forward.__code__.co_names and callable(forward.__globals__.get(_ROPE_GLOBAL)):
        stand_in = _rope_stand_in(_known_rope(forward.__globals__[_ROPE_GLOBAL]), backend)
        return _copy_function(forward, {**forward.__globals__, _ROPE_GLOBAL: stand_in}, forward.__closure__)
    inner = getattr(forward, "__wrapped__", None)
    if inner is None:
        raise NoRopeHook(f"{forward.__qualname__} does not call {_ROPE_GLOBAL} from the globals of "
                          f"{forward.__module__}")
    inner_copy = _forward_with_rope_kernel(inner, backend)
    copy = _copy_function(forward, forward.__globals__, _closure_swapping(forward, inner, inner_copy))
    copy.__wrapped__ = inner_copy
    return copy


def _known_rope(original) -> types.FunctionType:
    """The plain apply_rotary_pos_emb inside `original` (a kernels Func module or the function),
    checked with its rotate_half against engine/speed/upstream.py.

    Raises:
        NoRopeHook: the Func holds no function, or the code is not a known version (the message is
            upstream.check's one-line reason).
    """
    try:
        fn = upstream.unwrap_hub_func(original)
    except ValueError as exc:
        raise NoRopeHook(upstream.warn_once(f"{ROPE_OFF} {exc}")) from None
    # a known apply_rotary_pos_emb calls rotate_half from its module's globals
    reason = upstream.check(_ROPE_GLOBAL, fn) or upstream.check(
        "rotate_half", getattr(fn, "__globals__", {}).get("rotate_half"))
    if reason:
        raise NoRopeHook(reason)
    return fn


def _closure_swapping(wrapper: types.FunctionType, old, new) -> tuple:
    """wrapper's closure with the one cell that holds `old` replaced by a new cell holding `new`."""
    cells = wrapper.__closure__ or ()
    hits = [i for i, cell in enumerate(cells) if _cell_value(cell) is old]
    if len(hits) != 1:
        raise NoRopeHook(f"a decorator on {wrapper.__qualname__} does not keep the function it "
                          "wraps in its closure")
    return tuple(types.CellType(new) if i == hits[0] else cell for i, cell in enumerate(cells))


def _cell_value(cell):
    """What a closure cell holds (None for an empty one)."""
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _copy_function(fn: types.FunctionType, namespace: dict, closure) -> types.FunctionType:
    """fn with other globals and closure; name, defaults, docs and attributes kept."""
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    for attr in ("__qualname__", "__module__", "__doc__", "__annotations__"):
        setattr(copy, attr, getattr(fn, attr))
    return copy


def _rope_stand_in(original: Callable, backend: str) -> Callable:
    """An apply_rotary_pos_emb taking the original's parameters and running kernels.apply_rope.

    The results have the dtype transformers' function gives: q and k promoted with cos and sin
    (q * cos), e.g. fp32 for bf16 q with fp32 cos/sin under autocast when the residual stream
    stays fp32 (training.stream_in_compute_dtype off); then q and k are upcast before the kernel.

    Raises:
        NoRopeHook: parameters other than (q, k, cos, sin[, position_ids=None][, unsqueeze_dim]).
            position_ids is accepted only where it is optional, as in the transformers versions
            that keep it "deprecated and unused" (older ones indexed cos/sin with it).
    """
    from cpt_studio.kernels import apply_rope

    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError) as exc:
        raise NoRopeHook(f"the signature of {_ROPE_GLOBAL} cannot be read ({exc})") from None
    params = signature.parameters
    names = tuple(params)
    if (names[:4] != _ROPE_ARGS or not set(names[4:]) <= {"position_ids", "unsqueeze_dim"}
            or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params.values())
            or ("position_ids" in params and params["position_ids"].default is not None)):
        raise NoRopeHook(f"{_ROPE_GLOBAL}{signature} has parameters the kernel does not take")

    def apply_rotary_pos_emb(*args, **kwargs):
        given = signature.bind(*args, **kwargs)
        given.apply_defaults()
        q, k, cos, sin = (given.arguments[n] for n in _ROPE_ARGS)
        return apply_rope(_promoted(q, cos, sin), _promoted(k, cos, sin), cos, sin,
                          unsqueeze_dim=given.arguments.get("unsqueeze_dim", 1), backend=backend)

    return apply_rotary_pos_emb


def _promoted(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x in the dtype of transformers' x * cos + rotate_half(x) * sin."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return x if x.dtype == dtype else x.to(dtype)

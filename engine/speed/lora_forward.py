"""Lean forwards for peft LoRA Linear layers: nn.Linear base, and a fused function for a 4-bit base.

peft's forward (peft 0.21 tuners/lora/layer.py and bnb.py) computes
    result = base(x); [result = result.clone()  (4-bit)]; x = x.to(A.dtype)  (plain Linear)
    result = result + lora_B(lora_A(dropout(x))) * scaling
i.e. per call a full-size clone (4-bit), a full-size `* scaling`, a full-size add, and under bf16
autocast an fp32 copy of x that autocast casts straight back.

nn.Linear base (the lean forward): the same math as
    out = base(x2d);  out.addmm_(x2d A^T, B^T, alpha=scaling)
on the 2-D view of x, in place on the base output, in the compute dtype (the autocast dtype under
autocast, else the LoRA weights' dtype): one small GEMM, one GEMM with the add and the scaling in
its epilogue, no full-size elementwise kernel. In place on the base output is autograd-safe:
F.linear and bitsandbytes' MatMul4Bit save their input / the packed weight, never their output, and
the output is not a view (x is flattened before the base runs, so autograd adds no CopySlices).

bitsandbytes Linear4bit base: one autograd function, LoRA4bitLinearFunction, in place of
bnb's Linear4bit.forward + MatMul4Bit + the casts, mm and addmm_ above: per projection 1 autograd
node instead of 9 (10 in peft's forward), and on an H200 (bf16 autocast, double-quant NF4, r16)
25 CUDA kernels per forward+backward instead of 30 (peft: 32) for a 4096x4096 projection over 4096
tokens, kernel time 542 instead of 562 us (peft: 630). With s = scaling, dt = compute dtype,
a = A.to(dt) [r, in], b = B.to(dt) [out, r], W = dequantize(packed) [out, in]:
    forward:  h = x a^T                          [N, r]
              y = x W^T (+ bias) + s h b^T        [N, out]   (one GEMM, then addmm_ into it)
    backward: t  = dy b                           [N, r]
              dx = dy W + s t a                   [N, in]    (W dequantized again, then addmm_)
              dA = s t^T x                        [r, in]    one GEMM each, s in the epilogue; fp32
              dB = s dy^T h                       [out, r]   out on CUDA (no bf16 rounding, no cast)
Saved for backward: x, h, a, b; never W nor y (W costs 4 bits a weight to keep packed and one
dequantization to rebuild). Only the gradients in ctx.needs_input_grad are computed.
The compute dtype is bitsandbytes' own choice: the autocast dtype under autocast, else the layer's
compute_dtype (else x's dtype); y comes back in x's dtype, as Linear4bit returns it.

Eligibility (both kinds): exactly one LoRA adapter, no variant (DoRA...), no lora_B bias, dropout
Identity (p=0), an exact nn.Linear / bnb Linear4bit base. At call time the forward falls back to
peft's own whenever adapters are disabled, merged, switched, or extra arguments are passed; a 4-bit
layer takes the lean path (base(x) then addmm_) instead of the fused function when its weight has
no quant_state, its bias is trained, or, without autocast, the compute dtype differs from the LoRA
weights' dtype (peft adds the LoRA product in the LoRA dtype there); and peft's forward when the
weight was repacked for bitsandbytes' AVX512-BF16 CPU inference kernel
(`quant_state.packing_format_for_cpu`: a layout dequantize_4bit does not read; the loader turns
that repacking off, engine/model/loading.py). tests/engine/test_lora_forward.py checks loss and every
trainable gradient against peft's forward.

Upstream versions (engine/speed/upstream.py, checked by engine/speed/patching.py before binding): peft's
forward of the layer (lora.Linear / lora.bnb.Linear4bit, and the _cast_input_dtype it calls) must be
one we know, and under a 4-bit layer so must bitsandbytes' Linear4bit.forward, which the fused
function does by hand; else the layer stays peft's (`library_code_changed`). engine/speed/lora_group.py
groups only layers that took the fused function, so it inherits these checks.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from cpt_studio.kernels.dispatch import use_triton
from cpt_studio.kernels.nf4_dequant import nf4_dequant

from . import upstream

LEAN_LABELS = {"linear": "LoRA Linear (lean fused add)",
               "4bit": "LoRA Linear4bit (fused 4-bit LoRA function)"}
_DEQUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_local = threading.local()   # .value_unused: set by value_unused() around one call
GROUP_ATTR = "_cpt_lora_group"   # (engine.speed.lora_group.ProjectionGroup, index) on a grouped layer


@contextlib.contextmanager
def value_unused():
    """The fused 4-bit LoRA projection called inside returns a placeholder instead of its value.

    Only for a call whose output is backpropagated through but never read: the MLP's down_proj in
    an offloaded checkpoint's recompute (engine.speed.patching), where the layer's output only carries
    the gradient. The function still saves x and x A^T for its backward, which needs no output,
    so the base GEMM, the LoRA B GEMM and the weight's dequantization are skipped (27% of a
    Llama-8B layer's projection FLOPs in the recompute). Other layer kinds ignore it.
    """
    previous = getattr(_local, "value_unused", False)
    _local.value_unused = True
    try:
        yield
    finally:
        _local.value_unused = previous


def _lora_classes():
    from peft.tuners.lora.layer import Linear as LoraLinear

    classes = {LoraLinear: "linear"}
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:
        return classes, None
    classes[LoraLinear4bit] = "4bit"
    return classes, bnb.nn.Linear4bit


def lora_layer_kind(module: nn.Module) -> str | None:
    """"linear" / "4bit" for a peft LoRA Linear of a supported base, else None (not a LoRA Linear)."""
    classes, bnb_linear4bit = _lora_classes()
    kind = classes.get(type(module))
    if kind == "linear" and type(module.base_layer) is nn.Linear:
        return kind
    if kind == "4bit" and bnb_linear4bit is not None and isinstance(module.base_layer, bnb_linear4bit):
        return kind
    return None


def lean_adapter(module: nn.Module) -> str | None:
    """The one adapter the lean forward would apply, or None to leave the layer as peft's."""
    names = list(module.lora_A.keys())
    if len(names) != 1 or module.active_adapters != names or module.disable_adapters or module.merged:
        return None
    name = names[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return None
    if type(module.lora_dropout[name]) is not nn.Identity or getattr(module, "fan_in_fan_out", False):
        return None
    return name


def library_code_changed(module: nn.Module) -> str | None:
    """Why this LoRA layer must stay peft's (upstream.check's reason, logged once), or None: peft's
    forward (and the _cast_input_dtype it calls) is not one the lean / fused forwards reproduce,
    or, under a 4-bit layer, bitsandbytes' Linear4bit.forward is not the one LoRA4bitLinearFunction
    does by hand (the lean path is no refuge there: it adds in place into that forward's output)."""
    kind = lora_layer_kind(module)
    key = "lora.bnb.Linear4bit.forward" if kind == "4bit" else "lora.Linear.forward"
    checks = [(key, type(module).forward),
              ("BaseTunerLayer._cast_input_dtype", type(module)._cast_input_dtype)]
    reason = upstream.check_all(checks, off=upstream.KNOWN[key].off)
    if reason is None and kind == "4bit":
        reason = upstream.check("bnb.Linear4bit.forward", type(module.base_layer).forward)
    return reason


def make_lean_forward(module: nn.Module, name: str, fallback):
    """The function to bind as `module.forward` (self = module); `fallback` is peft's bound forward."""
    lean = _make_lean_forward(name, fallback)
    if lora_layer_kind(module) != "4bit":
        return lean

    def lora_4bit_fused_forward(self, x, *args, **kwargs):
        if falls_back(self, name, args, kwargs):
            return fallback(x, *args, **kwargs)
        group = self.__dict__.get(GROUP_ATTR)   # engine.speed.lora_group: computed with its group
        if group is not None:
            out = group[0].output(group[1], x)
            if out is not None:
                return out
        call = fused_4bit_call(self, name, x)
        if call is not None:
            return LoRA4bitLinearFunction.apply(x, *call, getattr(_local, "value_unused", False))
        qs = getattr(self.base_layer.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            return fallback(x)  # repacked for bnb's CPU inference kernel: bnb's own path only
        return lean(self, x)  # qs lost (e.g. by FSDP): Linear4bit.forward restores it

    lora_4bit_fused_forward.adapter_name = name   # engine.speed.lora_group finds the fused layers by it
    return lora_4bit_fused_forward


def fused_4bit_call(self, name: str, x: torch.Tensor):
    """(packed, quant_state, bias, lora_A, lora_B, scaling, dtype), LoRA4bitLinearFunction's
    arguments after x for this call of a 4-bit LoRA layer, or None when it must take another path:
    no quant_state, a repacked CPU weight, a trained bias, or no usable compute dtype."""
    base = self.base_layer
    weight, bias = base.weight, base.bias
    qs = getattr(weight, "quant_state", None)
    if qs is None or getattr(qs, "packing_format_for_cpu", False) or (
            bias is not None and bias.requires_grad):
        return None
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    dt = _fused_compute_dtype(base, x, a)
    if dt is None:
        return None
    return weight.data, qs, bias, a, b, self.scaling[name], dt


def falls_back(self, name: str, args, kwargs) -> bool:
    """True when peft's own forward must run (adapters off, merged, switched, extra arguments...)."""
    return bool(args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [name]
                or name not in self.lora_A or type(self.lora_dropout[name]) is not nn.Identity)


def _make_lean_forward(name: str, fallback):
    def lora_lean_forward(self, x, *args, **kwargs):
        if falls_back(self, name, args, kwargs):
            return fallback(x, *args, **kwargs)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        out = self.base_layer(x2)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else a.dtype
        h = torch.mm(x2.to(dt), a.to(dt).t())
        scaling = self.scaling[name]
        if out.dtype == dt:
            out.addmm_(h, b.to(dt).t(), alpha=scaling)
        else:  # e.g. a bf16 base and fp32 LoRA without autocast: add in fp32, round once (as peft)
            out = out.add_(torch.mm(h, b.to(dt).t()), alpha=scaling)
        return out.view(*lead, out.shape[-1])

    return lora_lean_forward


def _fused_compute_dtype(base: nn.Module, x: torch.Tensor, lora_a: torch.Tensor) -> torch.dtype | None:
    """The dtype LoRA4bitLinearFunction computes in for this call, or None to take the lean path."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:  # Linear4bit.forward computes in compute_dtype (set at load), else in x's dtype
        dt = getattr(base, "compute_dtype", None) or x.dtype
        if dt != lora_a.dtype:
            return None
    return dt if dt in _DEQUANT_DTYPES else None


def dequantize_4bit_weight(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of a bnb 4-bit layer in `dtype` (what bnb.functional.dequantize_4bit
    computes in quant_state.dtype, here straight into `dtype`: no extra cast kernel).

    Double quantization (quant_state.nested): the per-block absmax is itself 8-bit, blockwise over
    state2; it is rebuilt in fp32 first (one kernel) and the offset added (one more), as bnb does.
    NF4 where Triton runs (CUDA; the interpreter in the CPU tests) takes one launch for all of it.
    """
    qs = quant_state
    if qs.quant_type == "nf4" and packed.dtype == torch.uint8 and use_triton(packed):
        # one Triton launch instead of bitsandbytes' two (and the offset add): kernels/nf4_dequant.py
        nested = (qs.state2.absmax, qs.state2.code, qs.state2.blocksize, qs.offset) if qs.nested else None
        return nf4_dequant(packed, qs.code, qs.absmax, qs.blocksize, qs.shape, dtype, nested)
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, s2.absmax, s2.code,
                                                                     s2.blocksize, torch.float32)
        absmax += qs.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, qs.blocksize, qs.quant_type,
                                                          qs.shape, dtype)


def _scaled_product(m1: torch.Tensor, m2: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha * m1 @ m2 in `dtype` (a LoRA weight's gradient), never rounded to a narrower dtype.

    One GEMM, alpha in its epilogue: addmm with beta=0 ignores its input (a 0-dim placeholder,
    never read). bf16/fp16 operands and an fp32 result on CUDA: out_dtype writes cuBLAS' fp32
    accumulator straight out (H200: 2 kernels, 37 us for [16, 4096] x [4096, 4096], against 4 and
    73 us for bf16 mm, cast, * alpha). Other devices have no such kernel: the product is rounded
    to the operands' dtype, then widened, which is what autograd gives through a cast today.
    """
    if m1.dtype == dtype:
        return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=alpha)
    if m1.is_cuda and dtype == torch.float32:
        return torch.addmm(m1.new_empty((), dtype=dtype), m1, m2, beta=0, alpha=alpha, out_dtype=dtype)
    return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=alpha).to(dtype)


class LoRA4bitLinearFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * (x A^T) B^T with W the dequantized 4-bit weight.

    Args of apply: x [..., in]; packed (the 4-bit weight's data) and its quant_state; bias [out] or
    None (frozen); lora_A [r, in], lora_B [out, r] (the trained weights, any float dtype); scaling;
    dtype, the compute dtype; skip_value (default False; see value_unused): return zeros broadcast
    to [..., out] (not writable) and compute only what the backward saves. Returns [..., out] in
    x's dtype. x is flattened to [N, in] inside, so the flatten and the un-flatten add no autograd
    nodes. The backward math is in the module
    docstring. The body needs no autocast handling: every GEMM operand is cast to dtype first, so
    autocast (whose dtype is dtype when it is on) has nothing left to cast.
    """

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias, lora_A, lora_B, scaling, dtype, skip_value=False):
        lead = x.shape[:-1]
        xc = x.reshape(-1, x.shape[-1]).to(dtype)                         # [N, in]
        ctx.packed, ctx.quant_state, ctx.scaling = packed, quant_state, scaling
        ctx.dtypes, ctx.x_shape = (x.dtype, lora_A.dtype, lora_B.dtype), x.shape
        if skip_value:
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            ctx.save_for_backward(xc, torch.mm(xc, a.t()), a, b)
            # a zero broadcast to the output's shape: no allocation (the residual add makes one)
            return x.new_zeros(()).expand(*lead, quant_state.shape[0])
        w = dequantize_4bit_weight(packed, quant_state, dtype)            # [out, in]
        # y is made in its final shape and written through a 2-D view: returned as a view, it could
        # not be modified in place downstream (autograd forbids that for custom-function views)
        y = torch.empty((*lead, w.shape[0]), dtype=dtype, device=x.device)
        y2 = y.view(-1, w.shape[0])                                       # [N, out]
        if bias is None:
            torch.mm(xc, w.t(), out=y2)
        else:
            torch.addmm(bias.to(dtype), xc, w.t(), out=y2)
        del w
        a, b = lora_A.to(dtype), lora_B.to(dtype)                         # [r, in], [out, r]
        h = torch.mm(xc, a.t())                                           # [N, r]
        y2.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(xc, h, a, b)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        return without_autocast(_lora_4bit_backward, ctx, dout)


def without_autocast(backward, ctx, grad):
    """backward(ctx, grad) with autocast off on grad's device: backward() may be called inside an
    autocast region, and these hand-written backwards cast every GEMM operand themselves."""
    dev = grad.device.type
    if torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            return backward(ctx, grad)
    return backward(ctx, grad)


def _lora_4bit_backward(ctx, dout):
    xc, h, a, b = ctx.saved_tensors
    x_dtype, a_dtype, b_dtype = ctx.dtypes
    need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
    s = ctx.scaling
    dout = dout.reshape(-1, dout.shape[-1]).to(a.dtype)                   # [N, out]
    dx = da = db = None
    t = torch.mm(dout, b) if need_x or need_a else None                    # [N, r]
    if need_x:
        dx = torch.mm(dout, dequantize_4bit_weight(ctx.packed, ctx.quant_state, a.dtype))  # [N, in]
        dx.addmm_(t, a, alpha=s)
        dx = dx.view(ctx.x_shape).to(x_dtype)
    if need_a:
        da = _scaled_product(t.t(), xc, s, a_dtype)                        # [r, in]
    if need_b:
        db = _scaled_product(dout.t(), h, s, b_dtype)                      # [out, r]
    return dx, None, None, None, da, db, None, None, None

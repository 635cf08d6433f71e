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

bitsandbytes Linear4bit base: one autograd function, kernels.lora_4bit_linear (kernels/lora_4bit.py:
the math, the saved tensors, the measurements), in place of bnb's Linear4bit.forward + MatMul4Bit +
the casts, mm and addmm_ above. Its compute dtype is bitsandbytes' own choice: the autocast dtype
under autocast, else the layer's compute_dtype (else x's dtype); y comes back in x's dtype, as
Linear4bit returns it. `project_value_unused(module, x)` runs it with skip_value=True, for the
MLP's down_proj in an offloaded checkpoint's recompute (engine/speed/patching.py).

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

import torch
from torch import nn

from cpt_studio.kernels import lora_4bit_linear

from . import upstream

LEAN_LABELS = {"linear": "LoRA Linear (lean fused add)",
               "4bit": "LoRA Linear4bit (fused 4-bit LoRA function)"}
_DEQUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUP_ATTR = "_cpt_lora_group"   # (engine.speed.lora_group.ProjectionGroup, index) on a grouped layer


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
    or, under a 4-bit layer, bitsandbytes' Linear4bit.forward is not the one kernels.lora_4bit_linear
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
            return lora_4bit_linear(x, *call)
        qs = getattr(self.base_layer.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            return fallback(x)  # repacked for bnb's CPU inference kernel: bnb's own path only
        return lean(self, x)  # qs lost (e.g. by FSDP): Linear4bit.forward restores it

    lora_4bit_fused_forward.adapter_name = name   # engine.speed.lora_group finds the fused layers by it
    return lora_4bit_fused_forward


def project_value_unused(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a call whose output is backpropagated through but never read.

    The MLP's down_proj in an offloaded checkpoint's recompute (engine/speed/patching.py): the
    layer's output there only carries the gradient. A layer bound with the fused 4-bit forward,
    called where that forward would take the fused function, runs it with skip_value=True: x and
    x A^T are saved for the backward, which needs no output, and a zero placeholder is returned;
    the weight's dequantization, the base GEMM and the LoRA B GEMM are skipped (27% of a Llama-8B
    layer's projection FLOPs in the recompute). Every other module, or call, is plain module(x).
    """
    name = getattr(module.__dict__.get("forward"), "adapter_name", None)
    if name is None or module._forward_hooks or module._forward_pre_hooks or falls_back(module, name, (), {}):
        return module(x)
    call = fused_4bit_call(module, name, x)
    if call is None:
        return module(x)
    return lora_4bit_linear(x, *call, skip_value=True)


def fused_4bit_call(self, name: str, x: torch.Tensor):
    """(packed, quant_state, bias, lora_A, lora_B, scaling, dtype), kernels.lora_4bit_linear's
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
    """The dtype kernels.lora_4bit_linear computes in for this call, or None to take the lean path."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:  # Linear4bit.forward computes in compute_dtype (set at load), else in x's dtype
        dt = getattr(base, "compute_dtype", None) or x.dtype
        if dt != lora_a.dtype:
            return None
    return dt if dt in _DEQUANT_DTYPES else None

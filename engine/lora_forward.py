"""A lean forward for peft LoRA Linear layers (nn.Linear or bitsandbytes Linear4bit base).

peft's forward (peft 0.21 tuners/lora/layer.py and bnb.py) computes
    result = base(x); [result = result.clone()  (4-bit)]; x = x.to(A.dtype)  (plain Linear)
    result = result + lora_B(lora_A(dropout(x))) * scaling
i.e. per call a full-size clone (4-bit), a full-size `* scaling`, a full-size add, and under bf16
autocast an fp32 copy of x that autocast casts straight back. The lean forward computes the same
    out = base(x2d);  out.addmm_(x2d A^T, B^T, alpha=scaling)
on the 2-D view of x, in place on the base output, in the compute dtype (the autocast dtype under
autocast, else the LoRA weights' dtype): one small GEMM, one GEMM with the add and the scaling in
its epilogue, no full-size elementwise kernel. The backward of addmm_ passes the output gradient
to the base unchanged and scales only the [tokens, r] and [r, out] gradients.

In place on the base output is autograd-safe: F.linear and bitsandbytes' MatMul4Bit save their
input / the packed weight, never their output, and the output is not a view (x is flattened before
the base runs, so the in-place op is not on a view and autograd adds no CopySlices).
tests/engine/test_patching.py checks loss and every trainable gradient against peft's forward.

Only layers with exactly one LoRA adapter, no variant (DoRA...), no lora_B bias, dropout Identity
(p=0) and an exact nn.Linear / bnb Linear4bit base are eligible; at call time the forward falls
back to peft's own whenever adapters are disabled, merged, switched, or extra arguments are passed.
"""
from __future__ import annotations

import torch
from torch import nn

LEAN_LABELS = {"linear": "LoRA Linear (lean fused add)", "4bit": "LoRA Linear4bit (lean fused add)"}


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


def make_lean_forward(module: nn.Module, name: str, fallback):
    """The function to bind as `module.forward` (self = module); `fallback` is peft's bound forward."""

    def lora_lean_forward(self, x, *args, **kwargs):
        if (args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [name]
                or name not in self.lora_A or type(self.lora_dropout[name]) is not nn.Identity):
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

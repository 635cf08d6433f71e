"""AdamW with 8-bit moments and stochastic rounding into bf16, one fused pass per parameter.

For the trained embed_tokens / lm_head of a large model (Llama-8B: 2 x 525M params): the weights
stay in bf16 and AdamW's two moments in 8 bits (kernels/adamw8bit.py), so a parameter costs
2 bytes of weight + 2 bytes of state (+ 8 bytes of fp32 scales per 256 elements, 0.03 byte an
element) + its grad, against 4 + 8 + 4 for fp32 weights with torch AdamW. A bf16 weight is updated
by stochastic rounding: lr 5e-6 on a weight of 0.02 is far below half a bf16 ulp, so rounding to
nearest would drop every update; rounded stochastically, each update lands in expectation. The
8-bit moment codes are rounded stochastically too: on a least-squares fit this tracks fp32
torch AdamW within 0.5% (deterministic codes lagged by 19%; tests/engine/test_fused_adamw.py).

    opt = FusedAdamW8bit([{"params": [emb.weight], "lr": 5e-5}], weight_decay=0.0)
    loss.backward(); opt.step(); opt.zero_grad()

Row-sparse grads (nn.Embedding(sparse=True)) are read as their rows only. The random bits of a
step depend only on (seed, the param's index in the optimizer, the step number), so a run resumed
from state_dict() continues bitwise as if it had never stopped.
"""
from __future__ import annotations

import torch

from cpt_studio.kernels.adamw8bit import adamw8bit_step, init_adamw8bit_state

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, param_index: int, step: int) -> int:
    """A 31-bit philox seed for one (param, step): splitmix64 of the three integers."""
    x = (seed * 0x9E3779B97F4A7C15 + param_index * 0xC2B2AE3D27D4EB4F + step * 0x165667B19E3779F9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFF


class FusedAdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update with blockwise 8-bit moments, for fp32 or bf16 params.

    Args:
        params: params or param groups (each group may set lr, betas, eps, weight_decay,
            stochastic_rounding); a scheduler edits group["lr"] as for torch AdamW.
        stochastic_rounding: round the moment codes and bf16 params stochastically (fp32 params
            are stored as they are); off, codes round to nearest (v up) and bf16 to nearest even.
        seed: base seed of the rounding noise; saved in the param groups, so a resume keeps it.
        backend: "auto" | "triton" | "torch" (cpt_studio.kernels.dispatch.use_triton).

    State per param: "step" (float32 0-d CPU tensor, like torch's), "m_q" int8 [n], "v_q" uint8
    [n], "m_scale" / "v_scale" fp32 [ceil(n / 256)].
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, stochastic_rounding: bool = True,
                 seed: int = 0, backend: str = "auto"):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid FusedAdamW8bit settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay} (need lr, eps, weight_decay >= 0 and "
                             "0 <= beta < 1)")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "stochastic_rounding": stochastic_rounding, "seed": seed}
        super().__init__(params, defaults)
        self.backend = backend

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1   # counts params without a grad too: the index is the param's identity
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state.update(init_adamw8bit_state(p))
                state["step"] += 1
                t = int(state["step"].item())
                grad = p.grad
                if grad.is_sparse:
                    if p.dim() != 2:
                        raise ValueError(f"FusedAdamW8bit takes sparse grads of 2-D params (embeddings) "
                                         f"only; this param has shape {tuple(p.shape)}")
                    grad = grad.coalesce()
                    grad = (grad.indices()[0], grad.values())
                adamw8bit_step(p, grad, state, step=t, lr=group["lr"], beta1=beta1, beta2=beta2,
                               eps=group["eps"], weight_decay=group["weight_decay"],
                               stochastic_rounding=group["stochastic_rounding"],
                               seed=step_seed(group["seed"], index, t), backend=self.backend)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """The base class casts every state tensor to the param's dtype (int8 codes and fp32 scales
        to bf16): the saved tensors are put back as they were, on the param's device."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)

"""Eval loss and perplexity per eval set, and sample generations from the user's prompts."""
from __future__ import annotations

import math
from typing import Callable

import torch


@torch.no_grad()
def evaluate_blocks(loss_fn: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor,
                    batch_size: int, device: torch.device) -> tuple[float, float]:
    """Mean next-token loss over all blocks (each block weighs the same) and its perplexity.

    Args:
        loss_fn: maps input_ids [B, T] (on device) to the mean token loss of that batch.
        blocks: LongTensor [M, T] of packed blocks.
    """
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(device)
        loss = loss_fn(batch)
        total += float(loss) * batch.shape[0]
        count += batch.shape[0]
    mean = total / max(1, count)
    return mean, math.exp(min(mean, 50.0))


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int,
                     device: torch.device) -> list[str]:
    """Greedy continuations (deterministic, so runs can be compared) of each prompt."""
    texts = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        if encoded["input_ids"].shape[1] == 0:
            texts.append("")
            continue
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        new_tokens = output[0, encoded["input_ids"].shape[1]:]
        # A byte-level token cut at max_new_tokens can end mid-character: drop the stray U+FFFD.
        texts.append(tokenizer.decode(new_tokens, skip_special_tokens=True).rstrip("\ufffd"))
    return texts

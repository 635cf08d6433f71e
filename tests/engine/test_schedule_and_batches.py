"""Learning-rate schedule shapes and the resumable data order."""
import pytest
import torch

from cpt_studio.engine.data.batches import BlockSampler
from cpt_studio.engine.train.optim import lr_factor


def test_warmup_then_decay_to_zero():
    factors = [lr_factor(s, 4, 20, "cosine") for s in range(21)]
    assert factors[:4] == sorted(factors[:4]) and factors[0] > 0     # warmup rises, never 0
    assert factors[4] == pytest.approx(1.0)
    assert factors[20] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))    # then falls
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_factor(15, 4, 20, "constant") == 1.0


def test_sampler_covers_each_block_once_per_epoch():
    sampler = BlockSampler(10, 3, seed=7)
    seen = torch.cat([sampler.next_indices() for _ in range(sampler.batches_per_epoch)])
    assert len(set(seen.tolist())) == 9       # 3 batches of 3, one block left for next epoch
    assert sampler.next_indices().shape == (3,)
    assert sampler.epoch == 1


def test_sampler_resumes_at_the_same_position():
    a = BlockSampler(17, 4, seed=3)
    for _ in range(6):
        a.next_indices()
    b = BlockSampler(17, 4, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(9):
        assert torch.equal(a.next_indices(), b.next_indices())


def test_batch_larger_than_corpus_uses_all_blocks():
    sampler = BlockSampler(2, 8, seed=0)
    assert sampler.next_indices().numel() == 2

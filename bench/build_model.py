"""Write a random-init Llama model folder (config + sharded bf16 safetensors + a stand-in tokenizer).

    python bench/build_model.py --shape p1|p2|tiny --out DIR

Weights are drawn on the GPU when there is one (seconds for 8B), else on the CPU. The tokenizer is
a word-level one with exactly vocab_size entries and no meaning: the benches feed random token ids,
it is there only so that loaders that also load a tokenizer find one (and never resize the model).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, log  # noqa: E402


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]   # ids 0, 1, 2 = the config's bos/eos ids
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>")
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    tok.save_pretrained(str(folder))


def build(shape: str, out: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (out / "config.json").is_file():
        log(f"{out} exists, reusing it")
        return out
    config = LlamaConfig(**SHAPES[shape]["config"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    log(f"{shape}: {n / 1e9:.3f}B params initialised on {device} in {time.time() - t0:.1f}s")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="4GB")
    write_tokenizer(tmp, config.vocab_size)
    (tmp / "bench_shape.json").write_text(json.dumps({"shape": shape, "params": n}), "utf-8")
    del model
    os.replace(tmp, out)   # a folder with config.json is complete
    log(f"{shape}: saved to {out} in {time.time() - t0:.1f}s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True, help="model folder to create (kept if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.shape, Path(args.out), args.seed)


if __name__ == "__main__":
    main()

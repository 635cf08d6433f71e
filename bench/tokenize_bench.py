"""Tokenizing speed and memory on this machine's CPU (issue 14), against the tokenizer's ceiling.

    cd /tmp && /work/main/.venv/bin/python -P /work/main/bench/tokenize_bench.py --sizes-mb 100 1000

For each size: a synthetic corpus of that many MB (the sample corpus's Esperanto paragraphs,
shuffled, in 50 MB .txt files), then, each in a fresh process on the embedded default's tokenizer
(SmolLM2-135M):
- ceiling: the fast tokenizer's own batched call over the same pieces in the same batches (its
  Rust threads on, nothing stored): MB/s and tokens/s (each 50 MB file is one document: whole,
  it took the tokenizer 16 GB of RAM and ran at a third of the speed);
- ours: `build_packed_data` into an empty cache folder, with TOKENIZERS_PARALLELISM on and off:
  MB/s, tokens/s and the process's peak RSS.
Prints a table and writes bench/results/<date>_cpu_tokenize.json (--out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILE_MB = 50

_CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
mode, corpus, cache, model = sys.argv[1:5]
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(model)
start = time.perf_counter()
if mode == "ceiling":      # the same pieces and batches as ours, tokenized and thrown away
    from cpt_studio.engine.data.corpus import expand_corpus_paths
    from cpt_studio.engine.data.packing import _BATCH_CHARS, _BATCH_DOCS, document_pieces
    tokens, batch, chars = 0, [], 0
    for path in expand_corpus_paths([corpus]):
        for text, _ in document_pieces(path):
            batch.append(text)
            chars += len(text)
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                tokens += sum(map(len, tokenizer(batch, add_special_tokens=False)["input_ids"]))
                batch, chars = [], 0
    if batch:
        tokens += sum(map(len, tokenizer(batch, add_special_tokens=False)["input_ids"]))
else:
    from cpt_studio.engine.config import DataConfig
    from cpt_studio.engine.data.packing import build_packed_data
    data = build_packed_data(DataConfig(train_files=[corpus], seq_len=2048), tokenizer, Path(cache))
    tokens = data.stats["tokens"] - data.stats["documents"]          # without our EOS
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": tokens,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_corpus(folder: Path, size_mb: int) -> int:
    """Shuffled sample paragraphs in FILE_MB files; returns the bytes written."""
    from importlib.resources import files
    sample = Path(str(files("cpt_studio.resources") / "sample_corpus" / "esperanto"))
    paragraphs = [p.strip() for f in sorted(sample.glob("*.txt"))
                  for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(size_mb)
    folder.mkdir(parents=True)
    written, index = 0, 0
    while written < size_mb * 1e6:
        chunk = []
        size = 0
        while size < min(FILE_MB * 1e6, size_mb * 1e6 - written):
            text = rng.choice(paragraphs)
            chunk.append(text)
            size += len(text.encode("utf-8")) + 2
        (folder / f"part{index:04d}.txt").write_text("\n\n".join(chunk), encoding="utf-8")
        written += size
        index += 1
    return int(written)


def run_child(mode: str, corpus: Path, cache: Path, model: str, parallel: bool) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if parallel else "false")
    done = subprocess.run([sys.executable, "-P", "-c", _CHILD, mode, str(corpus), str(cache), model],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/...)")
    parser.add_argument("--no-one-thread", action="store_true",
                        help="leave out ours with one tokenizer thread (the slowest side)")
    args = parser.parse_args()
    from cpt_studio.engine.demo import demo_config
    from cpt_studio.engine.model.source import resolve_model_source

    root = Path(tempfile.mkdtemp(prefix="cpt-tokenize-bench-"))
    try:
        model = resolve_model_source(demo_config(1).model.source, root / "models").model_path
        records = []
        for size_mb in args.sizes_mb:
            corpus = root / f"corpus{size_mb}"
            nbytes = make_corpus(corpus, size_mb)
            row = {"size_mb": size_mb, "bytes": nbytes, "cpus": os.cpu_count()}
            sides = [("ceiling", "ceiling", True), ("ours", "ours", True),
                     ("ours_1thread", "ours", False)][:2 if args.no_one_thread else 3]
            for name, mode, parallel in sides:
                cache = root / f"cache-{size_mb}-{name}"
                result = run_child(mode, corpus, cache, str(model), parallel)
                result["mb_s"] = nbytes / 1e6 / result["seconds"]
                result["tokens_s"] = result["tokens"] / result["seconds"]
                row[name] = result
                shutil.rmtree(cache, ignore_errors=True)
                print(f"{size_mb} MB {name}: {result['mb_s']:.2f} MB/s, {result['tokens_s']:,.0f} "
                      f"tokens/s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
            row["ours_vs_ceiling"] = row["ours"]["mb_s"] / row["ceiling"]["mb_s"]
            records.append(row)
            shutil.rmtree(corpus)
        out = Path(args.out or Path(__file__).parent / "results" /
                   f"{time.strftime('%Y-%m-%d_%Hh%M', time.gmtime())}_cpu_tokenize.json")
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "records": records}, indent=1))
        print(f"\n| MB | ceiling MB/s | ours MB/s | ours / ceiling | ours 1 thread MB/s | "
              f"peak RSS MB (ours) |\n|---|---|---|---|---|---|")
        for r in records:
            print(f"| {r['size_mb']} | {r['ceiling']['mb_s']:.2f} | {r['ours']['mb_s']:.2f} | "
                  f"{r['ours_vs_ceiling']:.2f} | "
                  f"{format(r['ours_1thread']['mb_s'], '.2f') if 'ours_1thread' in r else '-'} | "
                  f"{r['ours']['peak_rss_mb']:.0f} |")
        print(f"results: {out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

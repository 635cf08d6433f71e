"""Where the host's time goes in the training steps: a reading of py-spy's folded stacks.

    python bench/host_profile.py pyspy_p2.txt.gz [--top 30] [--under run_steps]

Input: `py-spy record --format raw` (one line per distinct stack: frames from the root joined by
';', a space, the sample count), as `bench/device_run.sh pyspy` writes it. Only the samples whose
stack passes through a frame named --under (default run_steps: the timed loop of bench/common.py,
so loading and building are left out) are read, less those of warm-up work (Triton compiling,
imports: --keep-warmup keeps them). Those are the main thread's: the backward's
Python (recompute included) runs on autograd's device thread, whose stacks have no such frame;
there the main thread shows as _engine_run_backward, waiting (--under '' reads every thread). Prints the share of those samples
- by leaf frame (self time: where the host is when sampled; with --native, the C/C++ frames),
- by Python function anywhere on the stack below --under (inclusive time: our code, Triton's
  launcher, autograd, transformers' forwards...),
- waiting on the device (a CUDA synchronize or .item() on the stack) against issuing work.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import re
import sys

# Frames on the host's stack that mean "blocked until the GPU is done" (native frames: py-spy --native).
WAIT_FRAMES = re.compile(r"cudaStreamSynchronize|cudaEventSynchronize|cudaDeviceSynchronize|"
                         r"cuStreamSynchronize|cuEventSynchronize|cuCtxSynchronize|_local_scalar_dense|"
                         r"^synchronize \(|^Event\.synchronize|^Stream\.synchronize")
PYTHON_FRAME = re.compile(r"\.py:\d+\)$")


# Warm-up work with no place in a steady step: Triton compiling, its compiler subprocesses, imports.
WARMUP_FRAMES = re.compile(r"^(JITFunction\._do_compile|compile \(.*triton|Popen\.|_find_and_load)")


def read_folded(path: str, under: str, drop_warmup: bool = True) -> list[tuple[list[str], int]]:
    stacks = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.rstrip("\n")
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            if under and not any(f.startswith(under + " ") or f == under for f in frames):
                continue
            if drop_warmup and any(WARMUP_FRAMES.search(f) for f in frames):
                continue
            stacks.append((frames, int(count)))
    return stacks


def short(frame: str) -> str:
    """'fn (path/to/file.py:123)' -> 'fn (to/file.py:123)'; native frames as they are."""
    m = re.match(r"^(.*) \((?:.*/)?([^/]+/[^/]+)\)$", frame)
    return f"{m.group(1)} ({m.group(2)})" if m else frame


def summarise(stacks, top: int, under: str) -> str:
    total = sum(c for _, c in stacks)
    if not total:
        return "no samples under the chosen frame"
    leaf = collections.Counter()
    inclusive = collections.Counter()
    waiting = 0
    for frames, count in stacks:
        leaf[short(frames[-1])] += count
        if any(WAIT_FRAMES.search(f) for f in frames):
            waiting += count
        seen = set()
        start = next((i for i, f in enumerate(frames) if f.startswith(under + " ")), -1) + 1
        for f in frames[start:]:
            key = re.sub(r":\d+\)$", ")", short(f))   # inclusive: per function, not per line
            if key in seen or not PYTHON_FRAME.search(f):
                continue
            seen.add(key)
            inclusive[key] += count
    native = any(".so" in f for frames, _ in stacks for f in frames)
    wait_line = (f"waiting on the device: {100 * waiting / total:.1f}%, issuing work: "
                 f"{100 * (total - waiting) / total:.1f}%" if native else
                 "waiting on the device: not readable (Python frames only: a sync inside float() or "
                 ".item() shows as the calling line)")
    out = [f"samples read: {total:,}; {wait_line}", "",
           f"top {top} leaf frames (self)", *(f"{100 * c / total:6.1f}%  {k}" for k, c in leaf.most_common(top)),
           "", f"top {top} Python functions anywhere on the stack (inclusive)",
           *(f"{100 * c / total:6.1f}%  {k}" for k, c in inclusive.most_common(top))]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folded", help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--under", default="run_steps", help="only stacks through this function ('' = all)")
    parser.add_argument("--keep-warmup", action="store_true",
                        help="keep the samples of Triton compiling and imports (dropped by default)")
    args = parser.parse_args()
    stacks = read_folded(args.folded, args.under, not args.keep_warmup)
    print(summarise(stacks, args.top, args.under))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

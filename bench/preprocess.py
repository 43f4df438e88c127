"""Preprocessing benchmark: the tutorial's datasets.map pipeline against lm's token cache.

    python bench/preprocess.py [--sizes 50,200] [--workers N] [--tokenizer minilm|smollm2]

The corpus is this machine's Python standard library sources (every .py file under
sysconfig's stdlib path, sorted, concatenated, repeated if short) cut to each size in MB. Each
pipeline runs in a fresh subprocess; its peak RSS is the sum over its process tree (workers
included), sampled every 50 ms. Wall time is the preprocessing itself, after imports and tokenizer
loading, which both pipelines pay alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_corpus(path: Path, megabytes: int) -> None:
    """The stdlib .py sources, concatenated in sorted order (and again, if short) up to `megabytes`."""
    target = megabytes * 1_000_000
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    written = 0
    with open(path, "wb") as out:
        while written < target:
            for f in files:
                try:
                    data = f.read_bytes().decode("utf-8", "replace").encode("utf-8")
                except OSError:
                    continue
                data = data[: target - written]
                out.write(data)
                written += len(data)
                if written >= target:
                    break


def tokenizer_dir(name: str) -> str:
    sys.path.insert(0, str(ROOT))
    from lm import embedded

    return str(embedded.model_dir(embedded.MINILM if name == "minilm" else embedded.SMOLLM2))


# ---------------------------------------------------------------- the two pipelines (child processes)

def run_tutorial(corpus: str, tok_dir: str, block_size: int, work: str) -> dict:
    """run_clm_no_trainer.py's preprocessing: datasets.map tokenization, then the sum-based group_texts."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    counted = [0]

    def tokenize_function(examples):
        out = tokenizer(examples["text"])
        counted[0] += sum(map(len, out["input_ids"]))
        return out

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    started = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": corpus}, cache_dir=work, keep_linebreaks=True)
    tokenized = raw.map(tokenize_function, batched=True, batch_size=1000, remove_columns=["text"])
    blocks = tokenized.map(group_texts, batched=True, batch_size=1000)
    return {"seconds": time.perf_counter() - started, "tokens": counted[0], "blocks": len(blocks["train"])}


def run_ours(corpus: str, tok_dir: str, block_size: int, work: str, workers: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from lm.data import blocks_of
    from lm.texts import TextFile
    from lm.token_cache import prepare

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    started = time.perf_counter()
    prepared = prepare(TextFile(corpus), tokenizer, Path(work), workers)
    blocks = blocks_of(prepared.tokens(), block_size, "train")
    return {"seconds": time.perf_counter() - started, "tokens": prepared.num_tokens, "blocks": len(blocks),
            "reused": prepared.reused}


# ---------------------------------------------------------------- the driver

def measure(args: list[str]) -> dict:
    """Run this script as a child doing one pipeline; its result plus the peak RSS of its process tree."""
    import psutil

    child = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = child.stdout.read()
    if child.returncode != 0:
        raise SystemExit(f"{args[0]} failed with exit code {child.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50,200", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--workers", type=int, default=None, help="our tokenizing processes; default: the cores")
    parser.add_argument("--tokenizer", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--workdir", default=None, help="where corpora and caches go; default: a temporary dir")
    parser.add_argument("--child", nargs=3, metavar=("PIPELINE", "CORPUS", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tok_dir = tokenizer_dir(args.tokenizer)
    if args.child:
        pipeline, corpus, work = args.child
        result = (run_tutorial(corpus, tok_dir, args.block_size, work) if pipeline == "tutorial"
                  else run_ours(corpus, tok_dir, args.block_size, work, args.workers or len(os.sched_getaffinity(0))))
        print(json.dumps(result))
        return

    workers = args.workers or len(os.sched_getaffinity(0))
    common = ["--tokenizer", args.tokenizer, "--block-size", str(args.block_size), "--workers", str(workers)]
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        print(f"tokenizer {args.tokenizer}, block size {args.block_size}, our workers {workers}, "
              f"{len(os.sched_getaffinity(0))} cores", flush=True)
        print(f"{'corpus':>8} {'pipeline':<14} {'wall s':>8} {'tokens':>12} {'tokens/s':>10} {'blocks':>10} "
              f"{'peak RSS MB':>12}", flush=True)
        results = {}
        for size in sizes:
            corpus = Path(work) / f"corpus-{size}MB.txt"
            build_corpus(corpus, size)
            runs = [("tutorial", "tutorial", Path(work) / f"hf-{size}"), ("ours", "ours", Path(work) / f"lm-{size}"),
                    ("ours, cached", "ours", Path(work) / f"lm-{size}")]
            for label, pipeline, cache in runs:
                r = measure([*common, "--child", pipeline, str(corpus), str(cache)])
                results[size, label] = r
                print(f"{size:>6}MB {label:<14} {r['seconds']:>8.2f} {r['tokens']:>12,} "
                      f"{r['tokens'] / r['seconds']:>10,.0f} {r['blocks']:>10,} {r['peak_mb']:>12,.0f}", flush=True)
            corpus.unlink()
        largest, smallest = max(sizes), min(sizes)
        ours, tutorial = results[largest, "ours"], results[largest, "tutorial"]
        print(f"cached rerun at {largest} MB: {results[largest, 'ours, cached']['seconds']:.2f} s "
              f"({100 * results[largest, 'ours, cached']['seconds'] / ours['seconds']:.1f}% of the first run)")
        if len(sizes) > 1:
            growth = ours["peak_mb"] / results[smallest, "ours"]["peak_mb"] - 1
            print(f"our peak RSS {smallest} MB -> {largest} MB: {100 * growth:+.1f}%")
        print(f"preprocess speedup vs tutorial: {tutorial['seconds'] / ours['seconds']:.2f}x")


if __name__ == "__main__":
    main()

"""Packed conversations against --no-packing: labelled tokens per second, and the answer perplexity after one epoch.

    python bench/conversations.py                         # SmolLM2-135M, all 381 embedded conversations, CPU
    python bench/conversations.py --every 8 --validation 8   # a quick look: every 8th conversation
    python bench/conversations.py --device cuda --precision bf16

The training conversations of the embedded set (python-docs-chat: on Python 3.11 381 of them, a median
of 92 tokens, 32 over 256), or every --every-th of them (the same mix of short and long, fewer), and
the first --validation of its validation split are written to .jsonl files; the same run (the
embedded default model, --block-size, --batch-size rows a step, one epoch, so both runs see every
conversation once) trains on them twice: packed (whole conversations share a row, each attending to
itself) and --no-packing (one per row, a batch padded to its longest). The tokens that carry loss
are the same in both; packed rows hold fewer pad tokens, so a step does more of them. Reported side
by side: the labelled tokens per second of training (labelled tokens of the epoch / training
seconds) and the answer perplexity before and after.
Targets: packed / padded >= 1.5x labelled tokens per second, and answer perplexities within 2%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

from lm.chats import python_docs_conversations  # noqa: E402

SPEED_TARGET, PERPLEXITY_TARGET = 1.5, 0.02


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--every", type=int, default=1,
                   help="train on every k-th training conversation: the whole set's mix of lengths (default: 1, all)")
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--validation", type=int, default=None,
                   help="validation conversations scored, the first ones (default: all 43)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    return p.parse_args(argv)


def labelled_tokens(cfg, tokenizer, block: int) -> int:
    """The tokens that carry loss in one epoch of the training rows (the same packed or not)."""
    from lm.data import prepare_data
    from lm.distributed import World

    train, _ = prepare_data(cfg, tokenizer, block, World(), lambda *a, **k: None)
    return train.labelled_tokens()


def main(argv=None) -> None:
    args = parse_args(argv)
    from lm.config import Config
    from lm.embedded import SMOLLM2, model_dir
    from lm.modeling import load_tokenizer
    from lm.train import train

    train_chats, validation = python_docs_conversations()
    train_chats = train_chats[::args.every]
    folder = Path(tempfile.mkdtemp(prefix="bench-conversations-"))
    for name, rows in (("train", train_chats), ("valid", validation[:args.validation])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    tokenizer = load_tokenizer(str(model_dir(SMOLLM2)), {})
    results = {}
    for name, packed in (("packed", True), ("padded", False)):
        cfg = Config.for_task("clm", train_file=str(folder / "train.jsonl"), validation_file=str(folder / "valid.jsonl"),
                              block_size=args.block, batch_size=args.batch, epochs=1.0, lr=args.lr,
                              precision=args.precision, device=args.device, compile="off", no_packing=not packed,
                              output_dir=str(folder / name), log_every=1000)
        m = train(cfg)
        labelled = labelled_tokens(cfg, tokenizer, args.block)
        results[name] = dict(steps=m["train_steps"], seconds=m["train_seconds"], labelled=labelled,
                             labelled_per_second=labelled / m["train_seconds"], before=m["perplexity_before"],
                             after=m["perplexity"])
    print(f"\n{len(train_chats)} conversations (every {args.every}), block {args.block}, batch {args.batch} rows, "
          f"one epoch, precision {m['precision']}")
    print(f"{'':8} {'steps':>6} {'train s':>8} {'labelled':>9} {'labelled/s':>11} {'answer ppl before -> after':>28}")
    for name, r in results.items():
        print(f"{name:8} {r['steps']:>6} {r['seconds']:>8.1f} {r['labelled']:>9} {r['labelled_per_second']:>11.1f} "
              f"{r['before']:>15.3f} -> {r['after']:.3f}")
    speed = results["packed"]["labelled_per_second"] / results["padded"]["labelled_per_second"]
    gap = abs(results["packed"]["after"] / results["padded"]["after"] - 1)
    print(f"packed / padded labelled tokens/s: {speed:.2f}x (target >= {SPEED_TARGET}x: "
          f"{'met' if speed >= SPEED_TARGET else 'missed'})")
    print(f"answer perplexity after, packed against padded: {gap:.1%} apart (target <= {PERPLEXITY_TARGET:.0%}: "
          f"{'met' if gap <= PERPLEXITY_TARGET else 'missed'})")


if __name__ == "__main__":
    main()

"""What --document-boundaries costs a training step: the same blocks with and without their texts kept apart.

    python bench/document_boundaries.py                   # SmolLM2-135M, 8 x 128, CPU fp32: ~3 min on 2 cores
    python bench/document_boundaries.py --task mlm        # all-MiniLM-L6-v2

The embedded default model of the task inside TokenLoss, and one batch of --batch blocks of --block
tokens of the embedded corpus's training split, tokenized with --document-boundaries (texts end with
the end-of-text token, the cache keeps where they start). The blocks are the first ones that hold
more than one text, so every row takes the per-text path: the worst case (on the embedded corpus,
whose texts are long, most blocks hold one text and cost nothing extra). Two variants of that batch:

- with: the attention mask numbers each token's text (what the option gives the loss module): a
  (B, 1, T, T) block-diagonal mask and restarting positions, labels that stop at each text's end;
- without: the same ids as one text per row (mask of ones), as a run without the option sees them.

lm.train's step (forward, backward, clipping, AdamW; profile_step.train_step) runs on each variant in
alternation, --rounds times after a warmup step of each, and the median step times are compared with
the target: with / without <= 1.15.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

import torch  # noqa: E402

from lm import documents  # noqa: E402
from lm.config import Config, find_objective  # noqa: E402
from lm.data import Examples, blocks_of  # noqa: E402
from lm.embedded import cache_root, model_dir  # noqa: E402
from lm.hardware import resolve_device  # noqa: E402
from lm.losses import TokenLoss  # noqa: E402
from lm.modeling import load_model, load_tokenizer  # noqa: E402
from lm.optim import build_optimizer, parameter_groups  # noqa: E402
from lm.texts import TextList, python_docs_texts  # noqa: E402
from lm.token_cache import prepare  # noqa: E402
from profile_step import timed_step  # noqa: E402

TARGET = 1.15


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("clm", "mlm"), default="clm")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="timed steps of each variant, alternating (default: 5)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"))
    return p.parse_args(argv)


def batches(task: str, tokenizer, batch: int, block: int) -> dict[str, dict]:
    """{'with': ..., 'without': ...}: the first `batch` training blocks holding several texts, through the
    task's collator, with their texts numbered or as one text per row."""
    prepared = prepare(TextList(python_docs_texts()[0]), tokenizer, cache_root(), 1, say=lambda *a, **k: None,
                       documents=True)
    blocks = Examples(blocks_of(prepared.tokens(), block, "train"), prepared.starts())
    several = [item for item in (blocks[i] for i in range(len(blocks))) if item[2].max() > 1][:batch]
    collate = find_objective(task).collator(tokenizer, Config.for_task(task, mlm_prob=0.15, seed=0), False)
    return {"with": collate(several), "without": collate([(index, ids) for index, ids, _ in several])}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    objective = find_objective(args.task)
    path = (str(model_dir(objective.embedded_model)), {})
    tokenizer = load_tokenizer(*path)
    model, fresh = load_model(*path, objective.model_class)
    documents.prepare_model(model, device, args.precision)
    model.to(device).train()
    module = TokenLoss(model)
    cfg = Config.for_task(args.task)
    optimizer = build_optimizer(parameter_groups(model, cfg.lr, cfg.weight_decay, fresh, cfg.head_lr), cfg)
    variants = batches(args.task, tokenizer, args.batch, args.block)
    texts = variants["with"]["attention_mask"].max(dim=1).values.tolist()
    print(f"{device} ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"{args.task} {objective.embedded_model}, {args.precision}, batch {args.batch} x {args.block}, "
          f"texts per block {texts}, attention {model.config._attn_implementation}", flush=True)
    times = {name: [] for name in variants}
    started = time.perf_counter()
    for round in range(args.rounds + 1):  # round 0 warms up
        order = list(variants) if round % 2 else list(reversed(variants))  # alternate who goes first
        for name in order:
            seconds = timed_step(module, model, optimizer, variants[name], device, args.precision, cfg.max_grad_norm)
            if round:
                times[name].append(seconds)
        if round:
            print(f"round {round}: " + ", ".join(f"{name} {times[name][-1]:.3f} s" for name in variants), flush=True)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = median["with"] / median["without"]
    for name, ts in times.items():
        print(f"{name:<8} median {median[name]:.3f} s per step (min {min(ts):.3f}, max {max(ts):.3f})")
    print(f"document boundaries step time ratio: {ratio:.3f}x (target <= {TARGET}: "
          f"{'met' if ratio <= TARGET else 'missed'}); {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

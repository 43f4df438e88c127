"""What --eval-stride costs: strided evaluation against block evaluation of the same split and model.

    python bench/eval_stride.py                          # SmolLM2-135M, block 128, strides 64 and 32, CPU fp32
    python bench/eval_stride.py --blocks 24 --rounds 3   # the first 24 blocks' tokens: a quicker run

The embedded CLM default (or --model DIR) evaluated on the validation split of the embedded corpus
(its first --blocks blocks' tokens; default: all of it) by lm.evaluation.evaluate, the way a run
evaluates: batches of --batch, disjoint blocks with CausalCollator, or Windows every --strides tokens
with WindowCollator. The configurations alternate, --rounds times, each round in another order; the
median times are compared with the target: strided time <= (block / stride) x block time x 1.1.
A window is as long as a block, and there are about block / stride times as many windows as blocks,
so the forward passes alone cost that ratio; the head runs on the labelled positions only, fewer per
window than per block.
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
from torch.utils.data import DataLoader  # noqa: E402

from lm.data import CausalCollator, Examples, WindowCollator, Windows, blocks_of  # noqa: E402
from lm.embedded import SMOLLM2, cache_root, model_dir  # noqa: E402
from lm.evaluation import evaluate, perplexity  # noqa: E402
from lm.hardware import resolve_device  # noqa: E402
from lm.losses import TokenLoss  # noqa: E402
from lm.modeling import load_model, load_tokenizer  # noqa: E402
from lm.texts import TextList, python_docs_texts  # noqa: E402
from lm.token_cache import prepare  # noqa: E402

SLACK = 1.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a causal LM directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--strides", default="64,32", help="comma-separated (default: 64,32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--blocks", type=int, help="evaluate the first N blocks' tokens only (default: the whole split)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    path = (args.model or str(model_dir(SMOLLM2)), {})
    tokenizer = load_tokenizer(*path)
    model, _ = load_model(*path, "AutoModelForCausalLM")
    module = TokenLoss(model.to(device))
    ids = prepare(TextList(python_docs_texts()[1]), tokenizer, cache_root(), 1, "validation",
                  say=lambda *a, **k: None).tokens()
    ids = ids[:args.blocks * args.block if args.blocks else None]
    strides = [int(s) for s in args.strides.split(",")]
    loaders = {"blocks": DataLoader(Examples(blocks_of(ids, args.block, "validation")), batch_size=args.batch,
                                    collate_fn=CausalCollator(tokenizer))}
    for stride in strides:
        loaders[f"stride {stride}"] = DataLoader(Windows(ids, args.block, stride), batch_size=args.batch,
                                                 collate_fn=WindowCollator(tokenizer))
    print(f"{device} ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"{path[0]}, {args.precision}, {len(ids)} tokens: "
          + ", ".join(f"{name} {len(loader.dataset)} x {args.block}" for name, loader in loaders.items()), flush=True)
    times, ppl = {name: [] for name in loaders}, {}
    started = time.perf_counter()
    for round in range(args.rounds):
        names = list(loaders)
        for name in names[round % len(names):] + names[:round % len(names)]:  # rotate who goes first
            t = time.perf_counter()
            ppl[name] = perplexity(evaluate(module, loaders[name], device, args.precision))
            times[name].append(time.perf_counter() - t)
        print(f"round {round + 1}: " + ", ".join(f"{name} {times[name][-1]:.1f} s" for name in loaders), flush=True)
    base = statistics.median(times["blocks"])
    print(f"{'':<10}{'windows':>8}{'median s':>10}{'ratio':>8}{'target':>8}{'perplexity':>12}")
    print(f"{'blocks':<10}{len(loaders['blocks'].dataset):>8}{base:>10.1f}{1:>8.2f}{'':>8}{ppl['blocks']:>12.3f}")
    for stride in strides:
        name = f"stride {stride}"
        seconds, bound = statistics.median(times[name]), args.block / stride * SLACK
        print(f"{name:<10}{len(loaders[name].dataset):>8}{seconds:>10.1f}{seconds / base:>8.2f}{bound:>8.2f}"
              f"{ppl[name]:>12.3f}  {'met' if seconds / base <= bound else 'missed'}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""GGUF export of SmolLM2-135M: time, file size against parameters x bytes per weight, and llama.cpp's perplexity.

    python bench/gguf_export.py                      # the embedded SmolLM2-135M checkpoint, every type
    python bench/gguf_export.py --model runs/clm-X   # a fine-tuned output directory (python train_clm.py ...)

For each type (f32, f16, bf16, q8_0) python -m lm.gguf's export is timed (reading the checkpoint included), the
file's size is compared with (the parameters written) x (the type's bytes per weight) + (the header, metadata
and tensor index), and, where llama_cpp is installed, llama.cpp scores the validation split of the embedded corpus
the way our evaluation does (and so does the model transformers' GGUF reader builds from the file): disjoint blocks of --block tokens, each token predicted from those before it in its
block, perplexity = exp(summed loss / predicted tokens). The fp32 checkpoint is scored the same way by
lm.evaluation.evaluate. Targets: q8_0 export <= 10 s; size within 2%; q8_0 perplexity within 1% of fp32's.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lm import gguf as export  # noqa: E402
from lm.data import CausalCollator, Examples, blocks_of  # noqa: E402
from lm.embedded import SMOLLM2, cache_root, model_dir  # noqa: E402
from lm.evaluation import evaluate, perplexity  # noqa: E402
from lm.losses import TokenLoss  # noqa: E402
from lm.modeling import load_model, load_tokenizer  # noqa: E402
from lm.texts import TextList, python_docs_texts  # noqa: E402
from lm.token_cache import prepare  # noqa: E402

BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # Q8_0: 32 int8 + one fp16 scale


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a causal LM directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--types", default=",".join(export.TYPES))
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--blocks", type=int, default=40, help="score the first N validation blocks (default 40)")
    p.add_argument("--out", help="where the files go (default: a temporary directory)")
    return p.parse_args(argv)


def size_check(path: Path, kind: str) -> tuple[int, int, float]:
    """(parameters written, bytes expected from them, the file's size / that - 1)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    n = sum(int(t.n_elements) for t in reader.tensors)
    expected = reader.data_offset + n * BYTES_PER_WEIGHT[kind]
    return n, int(expected), path.stat().st_size / expected - 1


def llama_cpp_perplexity(path: Path, blocks: list[list[int]]) -> float:
    """exp(mean loss) of each block's next-token predictions, as llama.cpp computes the logits."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(map(len, blocks)), logits_all=True, verbose=False,
                n_threads=os.cpu_count())
    total, count = 0.0, 0
    try:
        for ids in blocks:
            llm.reset()
            llm.eval(ids)
            scores = torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float64)
            total += float(torch.nn.functional.cross_entropy(scores[:-1], torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    finally:
        llm.close()
    return math.exp(total / count)


def transformers_perplexity(path: Path, loader: DataLoader) -> float:
    """The same blocks scored by the model that transformers' own GGUF reader builds from the file."""
    from transformers import AutoModelForCausalLM

    from lm.embedded import quiet_stderr

    with quiet_stderr():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return perplexity(evaluate(TokenLoss(model), loader, torch.device("cpu"), "fp32"))


def main(argv=None) -> None:
    args = parse_args(argv)
    source = Path(args.model or model_dir(SMOLLM2))
    out = Path(args.out or tempfile.mkdtemp(prefix="gguf-bench-"))
    kinds = args.types.split(",")
    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    print(f"{source}; {os.cpu_count()} cores, torch {torch.__version__}; llama_cpp "
          + (__import__("llama_cpp").__version__ if have_llama_cpp else "not installed: no perplexity"), flush=True)

    tokenizer = load_tokenizer(str(source), {})
    ids = prepare(TextList(python_docs_texts()[1]), tokenizer, cache_root(), 1, "validation",
                  say=lambda *a, **k: None).tokens()[:args.blocks * args.block]
    blocks = blocks_of(ids, args.block, "validation")
    model, _ = load_model(str(source), {}, "AutoModelForCausalLM")
    loader = DataLoader(Examples(blocks), batch_size=8, collate_fn=CausalCollator(tokenizer))
    reference = perplexity(evaluate(TokenLoss(model), loader, torch.device("cpu"), "fp32"))
    del model
    block_ids = [[int(t) for t in block] for block in blocks]
    print(f"fp32 checkpoint: perplexity {reference:.4f} on {len(block_ids)} blocks of {args.block} "
          "(lm.evaluation.evaluate)", flush=True)

    print(f"{'type':<6}{'export s':>9}{'MB':>9}{'params':>13}{'expected MB':>12}{'size':>8}{'transformers ppl':>17}"
          f"{'vs fp32':>9}{'llama.cpp ppl':>15}{'vs fp32':>9}")
    for kind in kinds:
        started = time.perf_counter()
        written = export.export(source, kind, out / f"model-{kind}.gguf", say=lambda *a, **k: None)
        seconds = time.perf_counter() - started  # reading the checkpoint included
        n, expected, off = size_check(written.path, kind)
        read = transformers_perplexity(written.path, loader)
        ppl = llama_cpp_perplexity(written.path, block_ids) if have_llama_cpp else float("nan")
        print(f"{kind:<6}{seconds:>9.1f}{written.size / 1e6:>9.1f}{n:>13,}{expected / 1e6:>12.1f}"
              f"{off:>+8.2%}{read:>17.4f}{read / reference - 1:>+9.2%}{ppl:>15.4f}{ppl / reference - 1:>+9.2%}"
              + (f"  ({len(written.widened)} tensors F16)" if written.widened else ""), flush=True)
    print(f"files in {out}")


if __name__ == "__main__":
    main()

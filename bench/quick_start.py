"""The conversational quick start, then the same steps with --loss-on all: answer perplexities, wall time, answers.

    python bench/quick_start.py                            # the quick start and its --loss-on all twin, CPU
    python bench/quick_start.py --max-train-steps 2 --max-eval-samples 2   # a quick look

Runs `python train_clm.py --dataset python-docs-chat --block-size 256` as a user would (wall time:
the whole command, start to exit), then the same with `--loss-on all`: the same rows in the same
order, so the same steps, only every token of a conversation carries loss (the default system turn,
the questions, the headers). That run's own perplexity is over every token, so its model is scored
again with --eval-only on the assistant's tokens of the validation conversations, the quick start's
measure. Flags after the bench's own go to both runs (and the scoring). Last, the greedy answer to
one held-out question (--question) before training and after each run.

Targets: the quick start's answer perplexity falls by >= 30% in <= 5 minutes on 2 cores, and the
assistant-only run ends at a lower answer perplexity than the --loss-on all one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lm, not an installed one

QUICK_START = [sys.executable, str(ROOT / "train_clm.py"), "--dataset", "python-docs-chat", "--block-size", "256"]
FALL_TARGET, SECONDS_TARGET = 0.30, 300
NEW_TOKENS = 96  # of each sample answer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--question", default="What does `os.path.dirname` do?",
                   help="a held-out question (a validation conversation's first turn) answered before and after")
    p.add_argument("--output", help="where the runs write (default: a temporary folder, kept)")
    return p.parse_known_args(argv)


def run(cmd: list[str], log: Path) -> float:
    """Run `cmd` (its output to `log`); returns its wall seconds, or stops the bench with the log's end."""
    started = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    return seconds


def answer(model_path: str, messages: list[dict], precision: str) -> str:
    """The model's greedy reply to the turns, rendered with the template's generation prompt, up to <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM

    from lm.hardware import autocast
    from lm.modeling import load_tokenizer
    from lm.texts import ChatPrompt

    tokenizer = load_tokenizer(model_path, {})
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = torch.tensor([ChatPrompt(tuple(messages), None).ids(tokenizer)])
    # greedy as lm.samples.greedy, with a key-value cache: reading the context again per token is slow at 96 tokens
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True)


def main(argv=None) -> None:
    args, extra = parse_args(argv)
    from lm.chats import python_docs_conversations
    from lm.embedded import SMOLLM2, model_dir

    out = Path(args.output or tempfile.mkdtemp(prefix="bench-quick-start-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{' '.join(['python', 'train_clm.py', *QUICK_START[2:], *extra])}  (runs in {out})", flush=True)
    seconds = run([*QUICK_START, *extra, "--output-dir", str(out / "assistant")], out / "assistant.log")
    ours = json.loads((out / "assistant" / "metrics.json").read_text())
    print(f"assistant: {seconds:.0f} s wall ({ours['train_seconds']:.0f} s training, {ours['train_steps']} steps), "
          f"answer perplexity {ours['perplexity_before']:.3f} -> {ours['perplexity']:.3f}", flush=True)
    run([*QUICK_START, *extra, "--loss-on", "all", "--output-dir", str(out / "all")], out / "all.log")
    every = json.loads((out / "all" / "metrics.json").read_text())
    run([*QUICK_START, *extra, "--model", str(out / "all"), "--eval-only", "--output-dir", str(out / "all-scored")],
        out / "all-scored.log")
    scored = json.loads((out / "all-scored" / "metrics.json").read_text())
    print(f"all:       {every['train_steps']} steps, perplexity over every token {every['perplexity_before']:.3f} -> "
          f"{every['perplexity']:.3f}; answer perplexity after {scored['perplexity']:.3f}", flush=True)

    fall = 1 - ours["perplexity"] / ours["perplexity_before"]
    print(f"\nquick start: answer perplexity {ours['perplexity_before']:.3f} -> {ours['perplexity']:.3f}, "
          f"{fall:.1%} lower (target >= {FALL_TARGET:.0%}: {'met' if fall >= FALL_TARGET else 'missed'}), "
          f"in {seconds:.0f} s wall (target <= {SECONDS_TARGET} s: "
          f"{'met' if seconds <= SECONDS_TARGET else 'missed'}), "
          f"precision {ours['precision']}")
    same = ours["train_steps"] == every["train_steps"]
    lower = ours["perplexity"] < scored["perplexity"]
    print(f"after {ours['train_steps']} steps{'' if same else ' (all: %d)' % every['train_steps']}: answer perplexity "
          f"loss on assistant {ours['perplexity']:.3f}, on all {scored['perplexity']:.3f} (target: assistant lower: "
          f"{'met' if lower and same else 'missed'})")

    held_out = next((c for c in python_docs_conversations()[1] if c[0]["content"] == args.question), None)
    if held_out is None:
        sys.exit(f"--question {args.question!r} is not a held-out question of python-docs-chat")
    print(f"\nheld-out question: {args.question}\nreference answer: {held_out[1]['content']!r}")
    for name, path in (("before", str(model_dir(SMOLLM2))), ("after (assistant)", str(out / "assistant")),
                       ("after (all)", str(out / "all"))):
        print(f"{name}: {answer(path, held_out[:1], ours['precision'])!r}", flush=True)


if __name__ == "__main__":
    main()

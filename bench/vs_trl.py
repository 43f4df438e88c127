"""Our loop against TRL's SFTTrainer on conversations: tokens per second, side by side.

    python bench/vs_trl.py                              # SmolLM2-135M, embedded conversations, bf16, padded, CPU
    python bench/vs_trl.py --packed                     # both pack (TRL: its best-fit packing, padding-free)
    python bench/vs_trl.py --rounds 1 --steps 2 --warmup 1 --batch 2   # a quick look

Both sides fine-tune the embedded SmolLM2-135M-Instruct on the training conversations of the
embedded set (python-docs-chat), loss on the assistant's tokens, through the same ChatML template
written with `{% generation %}` markers (TRL's assistant_only_loss needs them; SmolLM2's own
template has none and TRL refuses to patch it): the same tokens carry loss on both sides (the
test tests/test_trl_reference.py checks it, and the losses). Each round trains once with each side,
alternating which goes first, every run in a fresh subprocess. The same AdamW, schedule, clipping,
batch of --batch conversations and precision; fp32 weights under bf16 autocast on both sides.

Padded (the default): one conversation per row, a batch padded to its longest, truncated to
--block tokens; both sides take the conversations in the same order (ours shuffled; TRL's sequential
sampler replays it), so a step holds the same tokens on both, and tokens/s compares the same work.
--packed: ours packs whole conversations into rows of --block tokens, each attending to itself; TRL
packs (best fit, into sequences of --block) and flattens a batch into one padding-free sequence.
The two pack differently, so a step's tokens differ: tokens/s counts each side's own.

A token is a conversation token a step trains on (not padding). Timing starts after --warmup steps:
the window runs from that step's end to the last timed step's end, and tokens/s is the tokens of
those steps over its seconds. Target: ours / TRL >= 1.5x tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

from vs_trainer import StepClock, Timed, machine  # noqa: E402  (bench/ is this script's directory)

SEED = 0
SPEED_TARGET = 1.5
# SmolLM2's ChatML (without its default system turn) with the assistant's answer and its <|im_end|> inside
# {% generation %}, as tests/test_conversations.py's MARKED_CHATML: the mask both sides compute from it is ours
# without markers too
MARKED_CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{%- else %}{{ message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="runs per side, alternating (default: 2)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run (default: 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (default: 2)")
    p.add_argument("--batch", type=int, default=8, help="conversations (padded) or rows (packed) a step (default: 8)")
    p.add_argument("--block", type=int, default=256, help="tokens a conversation or packed row holds at most")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--packed", action="store_true", help="both sides pack conversations (default: both pad)")
    p.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # one run, in a child
    p.add_argument("--folder", help=argparse.SUPPRESS)  # the parent's conversation files
    return p.parse_args(argv)


def write_conversations(folder: Path) -> None:
    """The embedded training conversations, and two validation ones (our run evaluates before and after, untimed)."""
    from lm.chats import python_docs_conversations

    train, validation = python_docs_conversations()
    for name, rows in (("train", train), ("valid", validation[:2])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    (folder / "chatml.jinja").write_text(MARKED_CHATML)


def config(args, out: str):
    from lm.config import Config

    folder = Path(args.folder)
    return Config.for_task("clm", train_file=str(folder / "train.jsonl"), validation_file=str(folder / "valid.jsonl"),
                           chat_template=str(folder / "chatml.jinja"), no_packing=not args.packed,
                           block_size=args.block, batch_size=args.batch, max_train_steps=args.warmup + args.steps,
                           lr_scheduler="linear", warmup_steps=2, log_every=1, seed=SEED, device="cpu",
                           precision=args.precision, compile="off", output_dir=out)


def run_side(args) -> dict:
    """One side's run in this process: its timed window and the tokens of each step."""
    clock = StepClock()
    tokens: list[int] = []  # a step's conversation tokens, in step order
    total = args.warmup + args.steps

    def on_step_end(n):
        if len(tokens) < len(clock.step_ends):  # no batch since the last step: the memory plan's step of a fake model
            clock.step_ends.pop()
            clock.cpu_ends.pop()
        elif len(clock.step_ends) == total:
            raise Timed

    clock.on_step_end = on_step_end
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as out:
        cfg = config(args, out)
        try:
            (train_ours if args.side == "ours" else train_trl)(cfg, clock, tokens)
        except Timed:
            pass
    window = clock.window(args.warmup)
    return {**window, "tokens": sum(tokens[args.warmup:total]), "step_tokens": tokens[:total]}


def train_ours(cfg, clock: StepClock, tokens: list[int]) -> None:
    from lm.losses import TokenLoss
    from lm.train import train

    class CountingLoss(TokenLoss):
        def forward(self, input_ids, attention_mask, labels):
            if self.training:  # a training step's tokens (not the evaluations before and after)
                tokens.append(int((attention_mask != 0).sum()))
            return super().forward(input_ids, attention_mask, labels)

    train(cfg, loss=lambda model: clock.watch(CountingLoss(model)))


def train_trl(cfg, clock: StepClock, tokens: list[int]) -> None:
    """SFTTrainer with assistant_only_loss on the same conversations; padded, fed in our order."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm.data import StepSampler
    from lm.embedded import SMOLLM2, model_dir
    from lm.texts import read_rows

    path = str(model_dir(SMOLLM2))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = Path(cfg.chat_template).read_text()
    model = clock.watch(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    rows = read_rows(cfg.train_file)
    if cfg.no_packing:  # our shuffle of the conversations (one a row), replayed through TRL's sequential sampler
        rows = [rows[i] for i in StepSampler(len(rows), cfg.shuffle_seed, cfg.batch_size).order().tolist()]
    args = trl.SFTConfig(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_train_steps,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_eps, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.log_every, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=cfg.seed, dataloader_num_workers=0, bf16=cfg.precision == "bf16",
        train_sampling_strategy="sequential" if cfg.no_packing else "random", assistant_only_loss=True,
        packing=not cfg.no_packing, max_length=cfg.block_size)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    collate = trainer.data_collator

    def counting(examples):  # padded: the attention mask's ones; padding-free (packed): every position
        batch = collate(examples)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting  # the train DataLoader is built from it when train() starts
    trainer.train()


def run_child(args, side: str) -> dict:
    """Run one side in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "--side", side, "--folder", args.folder, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--block", str(args.block),
           "--precision", args.precision, *["--packed"] * args.packed]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args)))
        return
    folder = tempfile.TemporaryDirectory(prefix="vs-trl-data-")
    args.folder = folder.name
    write_conversations(Path(args.folder))
    layout = "packed" if args.packed else "padded"
    print(f"ours against TRL {__import__('trl').__version__} SFTTrainer: SmolLM2-135M, embedded conversations, "
          f"{layout}, batch {args.batch}, block {args.block}, {args.precision}, {machine('cpu')}, {args.rounds} rounds "
          f"x {args.steps} timed steps per side after {args.warmup} warmup steps", flush=True)
    started = time.perf_counter()
    results = {"ours": [], "trl": []}
    for r in range(args.rounds):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            res = run_child(args, side)
            results[side].append(res)
            print(f"round {r + 1} {side:4}: {res['tokens'] / res['seconds']:8.1f} tokens/s ({res['tokens']} tokens in "
                  f"{res['seconds']:.1f} s), load average {res['load']:.1f}", flush=True)
    if not args.packed:  # the comparison is of the same work: check that it was
        steps = {side: runs[0]["step_tokens"] for side, runs in results.items()}
        if steps["ours"] != steps["trl"]:
            sys.exit(f"the sides' steps hold different tokens: ours {steps['ours']}, TRL {steps['trl']}")
        print(f"the same tokens each step on both sides: {steps['ours']}")
    speed = {side: [r["tokens"] / r["seconds"] for r in runs] for side, runs in results.items()}
    cpu = {side: statistics.median(r["tokens"] / r["cpu_seconds"] for r in runs) for side, runs in results.items()}
    print(f"\n{'':5} {'tokens/s median (min-max)':>28} {'tokens per CPU-second':>22}")
    for side, name in (("ours", "ours"), ("trl", "TRL")):
        s = speed[side]
        print(f"{name:5} {statistics.median(s):>10.1f} ({min(s):.1f}-{max(s):.1f}){'':>7} {cpu[side]:>19.1f}")
    ratio = statistics.median(speed["ours"]) / statistics.median(speed["trl"])
    print(f"total run time {time.perf_counter() - started:.0f} s")
    print(f"ours / TRL tokens/s ({layout}): {ratio:.2f}x (target >= {SPEED_TARGET}x: "
          f"{'met' if ratio >= SPEED_TARGET else 'missed'}); per CPU-second {cpu['ours'] / cpu['trl']:.2f}x")


if __name__ == "__main__":
    main()

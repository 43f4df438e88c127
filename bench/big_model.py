"""A model bigger than the machine allows in full: the memory plan refuses full fine-tuning in one line,
before anything is loaded, and LoRA trains it inside the plan.

    python bench/big_model.py DIR               # SmolLM2-1.7B's shape, random bf16 weights (3.4 GB) built in DIR
    python bench/big_model.py DIR --steps 3 --batch 8 --block 128

The model: a Llama with SmolLM2-1.7B's shape (hidden 2048, intermediate 8192, 24 layers, 32 heads, 32
key/value heads, vocabulary 49,152, tied embeddings) and the embedded CLM model's tokenizer, saved once
in DIR (reused when there). Then two runs of train_clm.py, each in its own process: full fine-tuning (the
plan should refuse it with exit code 2) and --lora-rank 16 (it should train, its peak RSS within its plan).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lm, not an installed one

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
             rms_norm_eps=1e-5, rope_theta=130000.0)


def build(target: Path) -> None:
    """Random bf16 weights of SHAPE with the embedded CLM tokenizer, in `target` (skipped when it holds a model)."""
    if (target / "config.json").exists():
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lm.embedded import model_dir
    from lm.objectives import CLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir(CLM.embedded_model))
    config = LlamaConfig(**SHAPE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of 1.7B parameters on the way
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {target} "
          f"({time.perf_counter() - started:.0f} s)")


def train(model: Path, args, out: Path, extra: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, str(ROOT / "train_clm.py"), "--model", str(model), "--batch-size", str(args.batch),
           "--block-size", str(args.block), "--max-train-steps", str(args.steps), "--max-eval-samples", "8",
           "--log-every", "1", "--compile", "off", "--output-dir", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return result, time.perf_counter() - started


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", type=Path, help="where the model is built (reused when it is there)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    args = p.parse_args(argv)
    build(args.dir)

    full, seconds = train(args.dir, args, args.dir.parent / "big-full", [])
    print(f"\nfull fine-tuning: exit code {full.returncode} after {seconds:.1f} s")
    print("  " + "\n  ".join((full.stderr.strip().splitlines() or ["(no error)"])[-1:]))

    lora_out = args.dir.parent / "big-lora"
    lora, seconds = train(args.dir, args, lora_out, ["--lora-rank", "16"])
    print(f"\nLoRA rank 16: exit code {lora.returncode} after {seconds:.0f} s")
    print("  " + next((line for line in lora.stdout.splitlines() if line.startswith("memory: ")), "(no plan line)"))
    if lora.returncode != 0:
        print(lora.stderr[-2000:])
        return
    m = json.loads((lora_out / "metrics.json").read_text())
    print(f"  {m['train_steps']} steps, peak RSS {m['peak_memory_gib']:.2f} GiB against {m['planned_memory_gib']:.2f} "
          f"planned ({m['peak_memory_gib'] / m['planned_memory_gib']:.2f}x), {m['trained_parameters']:,} of "
          f"{m['parameters']:,} parameters trained, {m['tokens_per_second']:.0f} tokens/s")


if __name__ == "__main__":
    main()

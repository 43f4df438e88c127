"""Command lines of transformers' run_clm.py and run_mlm.py, and the result files their users read.

test_run_clm and test_run_mlm are transformers' own tests of those scripts (examples/pytorch/
test_pytorch_examples.py), their command lines as written there but for --model_name_or_path: the
embedded default models stand in for the Hub's distilgpt2 and distilroberta-base. Their fixture is
tests/fixtures/sample_text.txt.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import metrics, run_script, scalars
from lm.cli import main
from lm.config import Config
from lm.train import train

SAMPLE_TEXT = "./tests/fixtures/sample_text.txt"  # from the repository root, as their tests name it
TRAIN_KEYS = {"train_loss", "train_runtime", "train_samples", "train_samples_per_second", "train_steps_per_second",
              "total_flos", "epoch"}
EVAL_KEYS = {"eval_loss", "perplexity", "eval_samples", "eval_runtime", "eval_samples_per_second",
             "eval_steps_per_second"}


def results(out, split: str) -> dict:
    return json.loads((out / f"{split}_results.json").read_text())


def assert_trainer_results(out, epochs: float) -> None:
    """train_, eval_ and all_results.json hold Trainer's keys, and agree with metrics.json."""
    trained, evaluated, both, ours = results(out, "train"), results(out, "eval"), results(out, "all"), metrics(out)
    assert set(trained) == TRAIN_KEYS and set(evaluated) == EVAL_KEYS | {"epoch"}
    assert both == {**trained, **evaluated}
    assert (evaluated["eval_loss"], evaluated["perplexity"]) == (ours["eval_loss"], ours["perplexity"])
    assert trained["epoch"] == evaluated["epoch"] == epochs
    assert trained["train_runtime"] == ours["train_seconds"] and trained["total_flos"] > 0
    assert trained["train_samples"] * ours["block_size"] * epochs == ours["train_tokens"]  # blocks of full length
    assert trained["train_samples_per_second"] == pytest.approx(epochs * trained["train_samples"]
                                                                / trained["train_runtime"])
    assert trained["train_steps_per_second"] == pytest.approx(ours["train_steps"] / trained["train_runtime"])
    assert evaluated["eval_samples_per_second"] == pytest.approx(evaluated["eval_samples"]
                                                                 / evaluated["eval_runtime"])
    assert 0 < trained["train_loss"] < math.log(ours["perplexity_before"]) + 1


def test_run_clm_command_line(tmp_path):
    out = tmp_path / "clm"
    testargs = f"""
        --train_file {SAMPLE_TEXT}
        --validation_file {SAMPLE_TEXT}
        --do_train
        --do_eval
        --block_size 128
        --per_device_train_batch_size 5
        --per_device_eval_batch_size 5
        --num_train_epochs 2
        --output_dir {out}
        --overwrite_output_dir
        --use_cpu
        """.split()
    result = run_script("clm", *testargs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert results(out, "all")["perplexity"] < 100  # what their test checks
    assert_trainer_results(out, epochs=2)
    # 8 blocks of 128 SmolLM2 tokens, 5 per step: 2 steps an epoch
    assert results(out, "eval")["eval_steps_per_second"] == pytest.approx(2 / results(out, "eval")["eval_runtime"])


def test_run_clm_config_overrides(smollm2_tokenizer, tmp_path):
    # Their command line as written, the Hub's gpt2 tokenizer replaced by a local byte-level BPE one. Without
    # --do_train or --do_eval lm does its run: it trains and evaluates, here on a 5% split shorter than a block.
    tokenizer = tmp_path / "tokenizer"
    smollm2_tokenizer.save_pretrained(tokenizer)
    testargs = f"""
        --model_type gpt2
        --tokenizer_name {tokenizer}
        --train_file {SAMPLE_TEXT}
        --output_dir {tmp_path / "clm"}
        --config_overrides n_embd=10,n_head=2
        --use_cpu
        """.split()
    result = run_script("clm", *testargs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"n_embd": 10' in result.stdout  # what their test checks in run_clm.py's log
    assert '"n_head": 2' in result.stdout


def test_run_mlm_command_line(tmp_path):
    # Their test checks perplexity < 42, reached by distilroberta-base, whose MLM head is pretrained. The
    # default MiniLM's head starts random (perplexity ~47000), and their command line trains one step: what
    # can hold is that the step learned.
    out = tmp_path / "mlm"
    testargs = f"""
        --train_file {SAMPLE_TEXT}
        --validation_file {SAMPLE_TEXT}
        --output_dir {out}
        --overwrite_output_dir
        --do_train
        --do_eval
        --prediction_loss_only
        --num_train_epochs=1
        --use_cpu
    """.split()
    result = run_script("mlm", *testargs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert results(out, "all")["perplexity"] < metrics(out)["perplexity_before"] / 5
    assert_trainer_results(out, epochs=1)


def test_train_loss_is_the_mean_of_the_steps_losses(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "run"
    train(Config.for_task("clm", model=tiny_gpt2, train_file=str(corpus), block_size=32, batch_size=3, epochs=2,
                          log_every=1, precision="fp32", output_dir=str(out)))
    losses = [loss for _, loss in scalars(out, "train/loss")]  # each step's mean loss per token, logged every step
    assert len(losses) == metrics(out)["train_steps"] > 2
    assert results(out, "train")["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert_trainer_results(out, epochs=2)


def test_do_eval_alone_writes_the_evaluation_results(tiny_bert, corpus, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main("mlm", ["--model_name_or_path", tiny_bert, "--train_file", str(corpus), "--do_eval",
                        "--validation_file", str(corpus), "--max_seq_length", "32", "--per_device_eval_batch_size", "2",
                        "--output_dir", str(out)]) == 0
    assert not (out / "train_results.json").exists()
    evaluated = results(out, "eval")
    assert set(evaluated) == EVAL_KEYS and results(out, "all") == evaluated
    assert (evaluated["eval_loss"], evaluated["perplexity"]) == (metrics(out)["eval_loss"], metrics(out)["perplexity"])
    assert evaluated["eval_steps_per_second"] == pytest.approx(math.ceil(evaluated["eval_samples"] / 2)
                                                               / evaluated["eval_runtime"])

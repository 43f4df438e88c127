"""Strided (sliding-window) perplexity: the same as block perplexity at stride = block, the published
definition below it, and reported as such."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import scalars
from lm.config import Config
from lm.errors import UsageError
from lm.texts import read_texts
from lm.train import train

BLOCK = 16


def stream_of(lines, tokenizer) -> list[int]:
    """A split's token stream as the .txt convention makes it: each line tokenized alone, concatenated."""
    return [i for line in lines for i in tokenizer(line)["input_ids"]]


def evaluate(model_dir, validation, out, **options) -> dict:
    """--eval-only of `model_dir` on the validation file, in fp32."""
    cfg = Config.for_task("clm", model=str(model_dir), train_file=str(validation), validation_file=str(validation),
                          block_size=BLOCK, eval_only=True, precision="fp32", output_dir=str(out), **options)
    return train(cfg)


def test_a_stride_of_the_block_size_is_block_perplexity_exactly(tiny_gpt2, corpus, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    lines = corpus.read_text().splitlines(keepends=True)[:20]
    while len(stream_of(lines, tokenizer)) % BLOCK:  # a split whose length is a multiple of the block size
        lines.append("word\n")
    validation = tmp_path / "valid.txt"
    validation.write_text("".join(lines))
    blocks = evaluate(tiny_gpt2, validation, tmp_path / "blocks")
    strided = evaluate(tiny_gpt2, validation, tmp_path / "strided", eval_stride=BLOCK)
    assert strided["perplexity"] == blocks["perplexity"]  # the same batches: bitwise the same sums
    assert (blocks["eval_stride"], strided["eval_stride"]) == (None, BLOCK)


def test_a_validation_split_shorter_than_a_block_is_evaluated_as_that_one_block(tiny_gpt2, corpus, tmp_path, capsys):
    # e.g. the 5% split of a short file (transformers' test_run_clm_config_overrides): scored as what it is
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    validation = tmp_path / "valid.txt"
    validation.write_text("the model reads a line of text\n")
    ids = stream_of([validation.read_text()], tokenizer)
    assert 2 <= len(ids) < BLOCK
    cfg = Config.for_task("clm", model=tiny_gpt2, train_file=str(corpus), validation_file=str(validation),
                          block_size=BLOCK, eval_only=True, precision="fp32", output_dir=str(tmp_path / "out"))
    result = train(cfg)
    assert (f"validation: {len(ids)} tokens, fewer than one block of {BLOCK}: evaluated as one block of {len(ids)}"
            in capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():  # HF's own mean over the block's len(ids) - 1 predictions
        expected = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert result["eval_tokens"] == len(ids)
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-5)


def sliding_window_perplexity(model, ids: list[int], block: int, stride: int) -> float:
    """Hugging Face's perplexity guide, verbatim in substance: one window at a time, HF's own loss."""
    ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + block, ids.size(1))
        target_len = end - prev_end  # may be different from stride on last loop
        window = ids[:, begin:end]
        targets = window.clone()
        targets[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(window, labels=targets).loss
        valid = (targets[:, 1:] != -100).sum().item()  # HF shifts the labels left by one
        nll_sum += loss.double().item() * valid
        n_tokens += valid
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("stride", [1, 5, 12])
def test_strided_perplexity_is_the_published_sliding_window_definition(stride, tiny_gpt2, docs_corpus, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    lines = read_texts(docs_corpus[1])[:30]
    while len(stream_of(lines, tokenizer)) < 10 * BLOCK or len(stream_of(lines, tokenizer)) % BLOCK == 0:
        lines.append("word\n")  # ~10 blocks and a remainder: the last window is shorter, and nothing is dropped
    validation = tmp_path / "valid.txt"
    validation.write_text("".join(lines))
    m = evaluate(tiny_gpt2, validation, tmp_path / "e", eval_stride=stride, eval_batch_size=3)
    ids = stream_of(lines, tokenizer)
    assert m["eval_tokens"] == len(ids)
    assert m["perplexity"] == pytest.approx(sliding_window_perplexity(model, ids, BLOCK, stride), rel=1e-5)
    # --max-eval-samples N keeps the tokens of N blocks
    limited = evaluate(tiny_gpt2, validation, tmp_path / "l", eval_stride=stride, max_eval_samples=4)
    assert limited["eval_tokens"] == 4 * BLOCK
    assert limited["perplexity"] == pytest.approx(sliding_window_perplexity(model, ids[:4 * BLOCK], BLOCK, stride),
                                                  rel=1e-5)


def test_training_reports_the_stride_and_measures_before_and_after_with_it(tiny_gpt2, docs_corpus, tmp_path):
    before = evaluate(tiny_gpt2, docs_corpus[1], tmp_path / "e", eval_stride=4)
    cfg = Config.for_task("clm", model=tiny_gpt2, train_file=docs_corpus[0], validation_file=docs_corpus[1],
                          block_size=BLOCK, max_train_steps=2, eval_every=1, eval_stride=4, precision="fp32",
                          lr=1e-3, output_dir=str(tmp_path / "run"))
    m = train(cfg)
    assert m["perplexity_before"] == pytest.approx(before["perplexity"], rel=1e-6) and m["eval_stride"] == 4
    assert scalars(tmp_path / "run", "eval/stride") == [(0, 4.0), (1, 4.0), (2, 4.0)]
    assert [s for s, _ in scalars(tmp_path / "run", "eval/perplexity")] == [0, 1, 2]


@pytest.mark.parametrize("options, message", [
    (dict(eval_stride=0), "--eval-stride must be a positive integer"),
    (dict(eval_stride=BLOCK + 1), f"--eval-stride {BLOCK + 1} is above --block-size {BLOCK}"),
])
def test_a_stride_out_of_range_is_refused_before_any_work(options, message):
    with pytest.raises(UsageError, match=message):
        Config.for_task("clm", block_size=BLOCK, **options)


def test_a_stride_above_the_default_block_size_is_refused(tiny_gpt2, docs_corpus, tmp_path):
    # no --block-size: the tiny model's 64 positions lower the default of 128
    with pytest.raises(UsageError, match="--eval-stride 100 is above the block size of 64"):
        train(Config.for_task("clm", model=tiny_gpt2, train_file=docs_corpus[0], eval_only=True, eval_stride=100,
                              output_dir=str(tmp_path / "e")))


def test_strided_evaluation_is_for_causal_lm_only():
    with pytest.raises(UsageError, match="--eval-stride is for causal LM only"):
        Config.for_task("mlm", eval_stride=8)

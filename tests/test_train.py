"""End to end: the real scripts on tiny models and on the embedded defaults, then reload what they saved."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from conftest import metrics, run_script, scalars
from lm.config import Config
from lm.losses import TokenLoss
from lm.texts import read_texts
from lm.train import train

TAGS = ["train/loss", "train/perplexity", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu",
        "eval/loss", "eval/perplexity"]
METRICS = {"eval_loss", "perplexity", "perplexity_before", "train_steps", "train_tokens", "train_seconds",
           "tokens_per_second", "precision"}


def check_run(out, steps, auto):
    m = metrics(out)
    assert METRICS <= set(m) and m["train_steps"] == steps and m["train_tokens"] > 0
    assert math.isclose(m["perplexity"], math.exp(m["eval_loss"]))
    assert 0 < m["mfu"] and math.isfinite(m["mfu"])  # against a measured matmul peak, on CPU too
    for tag in TAGS:
        assert scalars(out, tag), tag
    assert [s for s, _ in scalars(out, "train/loss")] == list(range(1, steps + 1))
    assert [s for s, _ in scalars(out, "eval/loss")] == [0, steps]
    return auto.from_pretrained(out), m


def test_clm_script_trains_logs_and_saves_a_loadable_model(tiny_gpt2, docs_corpus, tmp_path):
    out = tmp_path / "run"
    r = run_script("clm", "--model", tiny_gpt2, "--train-file", docs_corpus[0], "--validation-file", docs_corpus[1],
                   "--block-size", "32", "--max-train-steps", "6", "--log-every", "1", "--lr", "1e-3",
                   "--output-dir", out)
    assert r.returncode == 0, r.stderr
    model, m = check_run(out, 6, AutoModelForCausalLM)
    assert m["perplexity"] < m["perplexity_before"]
    # --compile auto (the default) decided after 3 steps: compiling never pays back on 6 tiny steps
    assert "compile off: " in r.stdout and m["compiled"] is False
    before = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before.transformer.h[0].mlp.c_fc.weight)
    assert "perplexity:" in r.stdout.splitlines()[-1]


@pytest.mark.parametrize("extra", [[], ["--line-by-line", "--grad-accum-steps", "2"]])
def test_mlm_script_trains_logs_and_saves_a_loadable_model(tiny_bert, docs_corpus, tmp_path, extra):
    out = tmp_path / "run"
    r = run_script("mlm", "--model", tiny_bert, "--train-file", docs_corpus[0], "--validation-file", docs_corpus[1],
                   "--block-size", "32", "--max-train-steps", "5", "--log-every", "1", "--lr", "1e-3",
                   "--output-dir", out, *extra)
    assert r.returncode == 0, r.stderr
    model, m = check_run(out, 5, AutoModelForMaskedLM)
    assert m["perplexity"] < m["perplexity_before"]


def test_eval_only_gives_the_exact_token_weighted_perplexity(tiny_gpt2, docs_corpus, tmp_path):
    r = run_script("clm", "--model", tiny_gpt2, "--train-file", docs_corpus[0], "--validation-file", docs_corpus[1],
                   "--block-size", "48", "--eval-only", "--eval-batch-size", "5", "--output-dir", tmp_path / "e",
                   "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    # Independently: the .txt convention (lines with their newline), tokenized one by one and
    # concatenated, cut into 48-token blocks; HF's own loss per block, weighted by its 47 predictions.
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    lines = open(docs_corpus[1], encoding="utf-8").read().split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    assert lines == read_texts(docs_corpus[1])
    ids = [i for line in lines for i in tokenizer(line)["input_ids"]]
    blocks = torch.tensor(ids[: len(ids) // 48 * 48]).view(-1, 48)
    with torch.no_grad():
        losses = [model(input_ids=b[None], labels=b[None]).loss.double() for b in blocks]
    expected = math.exp(sum(losses) * 47 / (47 * len(blocks)))
    # fp32 sums over a batch vs per-block means: equal to ~1e-7 in the loss, ~1e-6 after exp
    assert metrics(tmp_path / "e")["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_python_api_takes_a_custom_model_and_loss(tiny_gpt2, docs_corpus, tmp_path):
    calls = []

    class SmoothedLoss(TokenLoss):
        def forward(self, input_ids, attention_mask, labels):
            calls.append(input_ids.shape)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            keep = labels != -100
            return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum", label_smoothing=0.1)

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    cfg = Config.for_task("clm", train_file=docs_corpus[0], validation_file=docs_corpus[1], block_size=32, max_train_steps=2,
                          output_dir=str(tmp_path / "api"), precision="fp32")
    m = train(cfg, model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_gpt2), loss=SmoothedLoss)
    assert m["train_steps"] == 2 and calls and calls[0] == (8, 32)


def test_python_api_takes_a_model_or_a_tokenizer_alone(tiny_gpt2, docs_corpus, tmp_path):
    from lm.errors import UsageError

    common = dict(train_file=docs_corpus[0], validation_file=docs_corpus[1], block_size=32, max_train_steps=1,
                  precision="fp32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    # the tokenizer alone: the model comes from cfg.model; the model alone: its tokenizer from cfg.model
    alone = train(Config.for_task("clm", model=tiny_gpt2, output_dir=str(tmp_path / "t"), **common), tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    also = train(Config.for_task("clm", model=tiny_gpt2, output_dir=str(tmp_path / "m"), **common), model=model)
    assert alone["perplexity_before"] == pytest.approx(also["perplexity_before"], rel=1e-6)
    with pytest.raises(UsageError, match=r"train\(model=...\) needs tokenizer=... as well"):
        train(Config.for_task("clm", output_dir=str(tmp_path / "x"), **common), model=model)


def test_the_same_seed_trains_the_same_whether_the_peak_and_tokens_are_cached_or_not(tiny_bert, docs_corpus, tmp_path):
    # The first run measures the MFU peak and tokenizes; the second finds both cached. Dropout (0.1 in
    # the tiny BERT) and the masks must not notice: bitwise-equal weights.
    from safetensors.torch import load_file

    common = dict(model=tiny_bert, train_file=docs_corpus[0], validation_file=docs_corpus[1], block_size=32,
                  max_train_steps=3, precision="fp32", cache_dir=str(tmp_path / "cache"), peak_flops="auto")
    train(Config.for_task("mlm", output_dir=str(tmp_path / "first"), **common))
    assert (tmp_path / "cache" / "peak-flops.json").exists()
    train(Config.for_task("mlm", output_dir=str(tmp_path / "second"), **common))
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("first", "second"))
    assert [name for name in first if not torch.equal(first[name], second[name])] == []

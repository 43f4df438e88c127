"""The objectives in examples/: their collators, and each script run end to end from the command line."""

import importlib.util
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT, WORDS, metrics, minilm_tokenizer, scalars, tiny_model
from lm.config import Config
from lm.data import pad_batch
from lm.masking import IGNORE
from lm.data import causal_labels


def load(name: str):
    """An example script as a module: importing it registers its objective; main() does not run."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wwm, fim = load("whole_word_masking"), load("fill_in_the_middle")


def run_example(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra", [[], ["--document-boundaries"]])
@pytest.mark.parametrize("name, task", [("whole_word_masking", "mlm"), ("fill_in_the_middle", "clm"),
                                        ("z_loss", "clm")])
def test_example_trains(name, task, extra, model_dirs, corpus, tmp_path):
    out = tmp_path / "out"
    r = run_example(name, "--model", model_dirs[task], "--train-file", corpus, "--max-train-steps", 3,
                    "--block-size", 32, "--precision", "fp32", "--output-dir", out, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(out)
    assert m["train_steps"] == 3 and math.isfinite(m["eval_loss"])
    if name == "z_loss":
        (step, z), = scalars(out, "train/z_loss")
        assert step == 3 and 0 < z < 1  # 1e-4 x log(Z)^2 per token: log Z ~ log(30522) ~ 10 for a fresh model
    if name == "fill_in_the_middle":  # MiniLM's tokenizer has no FIM tokens: adapt added them, saved with the model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(out).get_vocab()
        assert all(t in vocab for t in fim.FIM_TOKENS) and len(vocab) == 30522 + 3
        assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().num_embeddings == 30522 + 3


def test_lion_plugs_in_from_examples_and_checkpoints_as_lion(model_dirs, corpus, tmp_path):
    out = tmp_path / "out"
    r = run_example("lion", "--model", model_dirs["clm"], "--train-file", corpus, "--max-train-steps", 3,
                    "--block-size", 32, "--precision", "fp32", "--lr", 3e-4, "--save-every", 3, "--output-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(out)
    assert m["train_steps"] == 3 and m["perplexity"] < m["perplexity_before"]
    assert json.loads((out / "checkpoints" / "step-3" / "state.json").read_text())["optimizer"] == "Lion"
    r = run_example("lion", "--model", model_dirs["clm"], "--train-file", corpus, "--optimizer", "sgd")
    assert r.returncode == 2 and r.stderr == "error: train(optimizer=...) builds the optimizer: drop --optimizer sgd\n"


def test_whole_word_masking_help():
    r = run_example("whole_word_masking", "--help")
    assert r.returncode == 0 and "whole-word masking" in r.stdout and "--mlm-prob" in r.stdout


# --- whole-word masking -------------------------------------------------------------------------

def word_texts(n: int, seed: int = 0) -> list[str]:
    """Lines mixing words WordPiece keeps whole with long ones it splits into several pieces."""
    rng = random.Random(seed)
    long_words = ["tokenization", "unbelievably", "reproducibility", "gradients", "checkpointing", "perplexities"]
    return [" ".join(rng.choices(WORDS + long_words, k=rng.randint(3, 20))) for _ in range(n)]


def examples(tokenizer, n: int, seed: int = 0) -> list[tuple[int, torch.Tensor]]:
    return [(i, torch.tensor(tokenizer(t)["input_ids"])) for i, t in enumerate(word_texts(n, seed))]


def words(tokens: list[str]) -> list[list[int]]:
    """Positions of each word, read off the WordPiece tokens directly: `##` continues a word."""
    found = []
    for i, token in enumerate(tokens):
        if token in ("[CLS]", "[SEP]", "[PAD]"):
            continue
        if token.startswith("##") and found and found[-1][-1] == i - 1:
            found[-1].append(i)
        else:
            found.append([i])
    return found


@pytest.fixture(scope="module")
def wwm_setup():
    tokenizer = minilm_tokenizer()
    return tokenizer, wwm.WholeWordCollator(tokenizer, Config.for_task("wwm", mlm_prob=0.15, seed=3))


def test_whole_words_are_masked_together(wwm_setup):
    tokenizer, collate = wwm_setup
    items = examples(tokenizer, 64)
    batch = collate(items, epoch=1)
    original = pad_batch(items, tokenizer.pad_token_id)["input_ids"]
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    picked_long = 0
    for row, (_, ids) in enumerate(items):
        labels = batch["labels"][row]
        for word in words(tokenizer.convert_ids_to_tokens(ids)):
            labelled = [labels[i] != IGNORE for i in word]
            assert all(labelled) or not any(labelled), "a word partly masked"
            picked_long += all(labelled) and len(word) > 1
        picked = labels[:len(ids)] != IGNORE
        assert torch.equal(labels[:len(ids)][picked], ids[picked])  # labels hold the original tokens
    assert picked_long > 0  # multi-piece words were picked, so the check above had something to check
    never = special | (batch["attention_mask"] == 0)  # [CLS], [SEP] and padding
    assert never.any() and (batch["labels"][never] == IGNORE).all()
    assert torch.equal(batch["input_ids"][never], original[never])  # left as they were


def test_whole_word_rate_is_mlm_prob(wwm_setup):
    tokenizer, collate = wwm_setup
    picked = maskable = sum_sq = masked = 0
    for epoch in range(4):
        items = examples(tokenizer, 500, seed=epoch)
        batch = collate(items, epoch=epoch)
        labelled = batch["labels"] != IGNORE
        picked += int(labelled.sum())
        masked += int((labelled & (batch["input_ids"] == tokenizer.mask_token_id)).sum())
        for _, ids in items:
            lengths = [len(w) for w in words(tokenizer.convert_ids_to_tokens(ids))]
            maskable += sum(lengths)
            sum_sq += sum(n * n for n in lengths)
    # words are picked independently: picked tokens have mean p * maskable, variance p(1-p) * sum of length^2
    p = collate.mlm_prob
    assert abs(picked - p * maskable) < 5 * math.sqrt(p * (1 - p) * sum_sq)
    assert abs(masked / picked - 0.8) < 5 * math.sqrt(0.8 * 0.2 / picked)  # the 80% [MASK] share, per token


def test_whole_word_mask_is_independent_of_batching(wwm_setup):
    tokenizer, collate = wwm_setup
    items = examples(tokenizer, 24)
    alone = {i: collate([(i, ids)], epoch=2) for i, ids in items}
    shuffled = random.Random(0).sample(items, len(items))
    for start in range(0, len(shuffled), 5):  # batches of 5 in another order, padded differently
        batch = collate(shuffled[start:start + 5], epoch=2)
        for row, (i, ids) in enumerate(shuffled[start:start + 5]):
            for key in ("input_ids", "labels"):
                assert torch.equal(batch[key][row, :len(ids)], alone[i][key][0])
    assert not torch.equal(collate(items[:1], epoch=3)["labels"], alone[0]["labels"])  # a fresh mask each epoch


# --- fill in the middle ---------------------------------------------------------------------------

def test_fim_adapt_adds_sentinels_once():
    tokenizer = minilm_tokenizer()
    model = tiny_model("clm", tokenizer)
    fim.add_fim_tokens(model, tokenizer)
    fim.add_fim_tokens(model, tokenizer)
    assert len(tokenizer) == 30522 + 3 == model.get_input_embeddings().num_embeddings
    assert tokenizer.convert_ids_to_tokens([30522, 30523, 30524]) == list(fim.FIM_TOKENS)


def test_fim_rearranges_blocks_prefix_suffix_middle():
    tokenizer = minilm_tokenizer()
    fim.add_fim_tokens(tiny_model("clm", tokenizer), tokenizer)
    collate = fim.FimCollator(tokenizer, Config.for_task("fim", seed=5))
    pre, mid, suf = (tokenizer.get_vocab()[t] for t in fim.FIM_TOKENS)
    n, size = 2000, 32
    items = [(i, 1000 + torch.randperm(5000, generator=torch.Generator().manual_seed(i))[:size]) for i in range(n)]
    batch = collate(items, epoch=0)
    assert batch["input_ids"].shape == (n, size)
    assert torch.equal(batch["labels"], causal_labels(batch["input_ids"], batch["attention_mask"]))
    rearranged, cuts = 0, set()
    for (_, ids), out in zip(items, batch["input_ids"]):
        if torch.equal(out, ids):
            continue
        rearranged += 1
        s, m = (out == suf).nonzero().item(), (out == mid).nonzero().item()
        assert out[0] == pre and 0 < s < m and (out == pre).sum() == 1
        prefix, suffix, middle = out[1:s], out[s + 1:m], out[m + 1:]
        assert torch.equal(torch.cat([prefix, middle, suffix]), ids[:-3])  # the text in order, its last 3 tokens dropped
        cuts.add((len(prefix), len(middle)))
    assert abs(rearranged / n - fim.FIM_RATE) < 5 * math.sqrt(fim.FIM_RATE * (1 - fim.FIM_RATE) / n)
    assert len(cuts) > 100  # cut points vary from block to block
    again = collate(list(reversed(items[:7])), epoch=0)["input_ids"]  # reproducible in any batching
    assert torch.equal(again.flip(0), batch["input_ids"][:7])


def test_fim_rearranges_each_text_of_a_block_on_its_own():
    # --document-boundaries: items carry which text each token belongs to, and FIM keeps every text in its place
    tokenizer = minilm_tokenizer()
    fim.add_fim_tokens(tiny_model("clm", tokenizer), tokenizer)
    collate = fim.FimCollator(tokenizer, Config.for_task("fim", seed=5))
    sentinels = torch.tensor([tokenizer.get_vocab()[t] for t in fim.FIM_TOKENS])
    texts = torch.tensor([1] * 9 + [2] * 3 + [3] * 20)  # a tail, a text too short to rearrange, a long one
    items = [(i, 1000 + torch.randperm(5000, generator=torch.Generator().manual_seed(i))[:32], texts)
             for i in range(200)]
    batch = collate(items, epoch=0)
    assert (batch["attention_mask"] == texts).all()
    rearranged = 0
    for (_, ids, _), out in zip(items, batch["input_ids"]):
        assert torch.equal(out[9:12], ids[9:12])
        for text in (1, 3):
            piece, original = out[texts == text], ids[texts == text]
            if not torch.equal(piece, original):  # sentinels inside the text, and its tokens but its last 3
                rearranged += 1
                assert piece[0] == sentinels[0] and torch.isin(sentinels, piece).all()
                assert sorted(piece[~torch.isin(piece, sentinels)].tolist()) == sorted(original[:-3].tolist())
    assert 100 < rearranged < 300  # about half of the 400 texts long enough

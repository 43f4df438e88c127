"""Conversations through the data path: the token cache's loss mask, packing against padding, labels, evaluation,
resume, torchrun and LoRA, on a tiny llama with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, WORDS, metrics, run_script, scalars
from lm import token_cache
from lm.config import Config
from lm.data import IGNORE, ConversationRows, CausalCollator, prepare_data
from lm.distributed import World
from lm.errors import UsageError
from lm.losses import TokenLoss
from lm.texts import Conversations, load_sources

# ChatML, as SmolLM2's, with {% generation %} around what the assistant writes (its <|im_end|> included)
MARKED_CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{%- else %}{{ message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def conversations(n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    """`n` rows of 1 to 3 exchanges of pseudo-words; with `long_every`, every such row's answer runs long."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 10))) + "?"})
            k = 150 if long_every and i % long_every == long_every - 1 else rng.randint(3, 16)
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=k)) + "."})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    """(train.jsonl, validation.jsonl): 24 and 6 conversations, one in 8 of the training ones too long for 128."""
    d = tmp_path_factory.mktemp("chats")
    return (write_jsonl(d / "train.jsonl", conversations(24, long_every=8)),
            write_jsonl(d / "valid.jsonl", conversations(6, seed=1)))


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer, tmp_path_factory):
    """A 2-layer llama over SmolLM2's vocabulary, saved with SmolLM2's tokenizer (and chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=smollm2_tokenizer.pad_token_id,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


def chat_config(chat_files, tmp_path, **extra) -> Config:
    return Config.for_task("clm", **{**dict(train_file=chat_files[0], validation_file=chat_files[1], block_size=128,
                                            cache_dir=str(tmp_path / "cache"), precision="fp32"), **extra})


def summed_loss(model, rows, collate, batch: int, texts: bool) -> tuple[float, int]:
    """(summed loss, labelled tokens) of every row of `rows`, `batch` rows at a time."""
    loss = TokenLoss(model)
    loss.texts = texts
    total, labelled = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(rows), batch):
            b = collate([rows[i] for i in range(lo, min(lo + batch, len(rows)))])
            total += float(loss(b["input_ids"], b["attention_mask"], b["labels"]))
            labelled += int((b["labels"] != IGNORE).sum())
    return total, labelled


def test_a_conversational_file_is_recognised_and_announced(chat_files, smollm2_tokenizer, tmp_path, capsys):
    cfg = chat_config(chat_files, tmp_path)
    sources = load_sources(cfg)
    assert isinstance(sources[0], Conversations) and sources[0].loss_on == "assistant"
    train, validation = prepare_data(cfg, smollm2_tokenizer, 128, World(), print)
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("conversations:")]
    assert len(line) == 1, line
    share = train.labelled_tokens() / train.num_tokens
    assert line[0].startswith("conversations: 24 train / 6 validation (messages), the tokenizer's chat template, "
                              f"loss on assistant: {share:.1%} of {train.num_tokens:,} train tokens; packed into "
                              f"{len(train)} rows of <= 128 tokens; truncated to 128 tokens: "
                              f"{train.truncated} train / {validation.truncated} validation")
    assert train.truncated + validation.truncated == 3
    assert 0.1 < share < 0.9
    with pytest.raises(UsageError, match="--loss-on is for conversational data"):
        load_sources(Config.for_task("clm", train_file=write_jsonl(tmp_path / "plain.jsonl", [{"text": "hi"}] * 9),
                                     loss_on="all"))


def test_labels_are_the_assistant_turns_and_their_end_of_turn(chat_files, smollm2_tokenizer, tmp_path):
    cfg = chat_config(chat_files, tmp_path, no_packing=True)
    train, _ = prepare_data(cfg, smollm2_tokenizer, 512, World(), print)
    batch = CausalCollator(smollm2_tokenizer)([train[0]])
    labelled = smollm2_tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE])
    messages = json.loads(open(chat_files[0]).readline())["messages"]
    assert labelled == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")


def test_a_packed_batch_has_the_loss_of_its_conversations_run_one_by_one(chat_files, smollm2_tokenizer, tiny_llama,
                                                                         tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").float().eval()
    torch.manual_seed(0)
    for p in model.parameters():  # weights large enough that a token's context moves its loss
        torch.nn.init.normal_(p, std=0.5)
    packed, _ = prepare_data(chat_config(chat_files, tmp_path), smollm2_tokenizer, 256, World(), print)
    alone, _ = prepare_data(chat_config(chat_files, tmp_path, no_packing=True), smollm2_tokenizer, 256, World(), print)
    assert len(packed) <= len(alone) // 2  # conversations share rows
    collate = CausalCollator(smollm2_tokenizer)
    packed_loss, packed_tokens = summed_loss(model, packed, collate, 4, texts=True)
    alone_loss, alone_tokens = summed_loss(model, alone, collate, 1, texts=False)
    assert packed_tokens == alone_tokens == packed.labelled_tokens()
    assert packed_loss == pytest.approx(alone_loss, rel=1e-6)
    # without per-text attention and positions the packed conversations would see each other: another loss
    crossed_loss, _ = summed_loss(model, packed, collate, 4, texts=False)
    assert crossed_loss != pytest.approx(alone_loss, rel=1e-4)


def test_no_packing_pads_one_conversation_per_row_to_the_batch_longest(chat_files, smollm2_tokenizer, tmp_path):
    train, _ = prepare_data(chat_config(chat_files, tmp_path, no_packing=True), smollm2_tokenizer, 128, World(), print)
    assert len(train) == 24 and train.truncated == 3
    items = [train[i] for i in range(4)]
    batch = CausalCollator(smollm2_tokenizer)(items)
    lengths = [len(item[1]) for item in items]
    assert batch["input_ids"].shape == (4, max(lengths)) and max(lengths) <= 128
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, (_, ids, _, mask) in enumerate(items):
        expected = torch.where(mask[1:], ids[1:], IGNORE)
        assert torch.equal(batch["labels"][row, :len(ids) - 1], expected)
        assert (batch["labels"][row, len(ids) - 1:] == IGNORE).all()


def test_no_packing_holds_under_document_boundaries(chat_files, smollm2_tokenizer, tiny_llama, tmp_path):
    from transformers import AutoConfig

    from lm.data import texts_apart

    cfg = chat_config(chat_files, tmp_path, no_packing=True, document_boundaries=True)
    sources = load_sources(cfg)
    packed = texts_apart(cfg, sources, AutoConfig.from_pretrained(tiny_llama), print)
    train, validation = prepare_data(cfg, smollm2_tokenizer, 128, World(), print, sources=sources, packed=packed)
    assert (len(train), len(validation)) == (24, 6)  # one conversation per row, as --no-packing says


def test_the_token_cache_keys_on_the_template_and_the_loss_rule(chat_files, smollm2_tokenizer, tmp_path, capsys):
    train = load_sources(chat_config(chat_files, tmp_path))[0]
    root = tmp_path / "cache"
    template = smollm2_tokenizer.chat_template
    first = token_cache.prepare_conversations(train, smollm2_tokenizer, template, root)
    again = token_cache.prepare_conversations(train, smollm2_tokenizer, template, root)
    assert again.reused and again.path == first.path
    marked = token_cache.prepare_conversations(train, smollm2_tokenizer, MARKED_CHATML, root)
    everything = token_cache.prepare_conversations(
        Conversations(train.conversations, train.format, "all"), smollm2_tokenizer, template, root)
    assert len({first.path, marked.path, everything.path}) == 3 and not (marked.reused or everything.reused)
    assert everything.loss_mask().all() and 0 < first.loss_mask().sum() < first.num_tokens
    (first.path / "mask.bin").write_bytes(b"\0")  # damaged: measured again, never a traceback
    rebuilt = token_cache.prepare_conversations(train, smollm2_tokenizer, template, root)
    assert not rebuilt.reused and (rebuilt.loss_mask() == again.loss_mask()).all()


@pytest.mark.parametrize("no_packing", [False, True])
def test_evaluation_is_the_perplexity_of_the_assistant_tokens(no_packing, chat_files, smollm2_tokenizer, tiny_llama,
                                                              tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    from lm.train import train

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).float().eval()
    torch.manual_seed(0)
    for p in model.parameters():  # weights large enough that a token's context moves its loss
        torch.nn.init.normal_(p, std=0.5)
    cfg = chat_config(chat_files, tmp_path, eval_only=True, no_packing=no_packing, block_size=256,
                      output_dir=str(tmp_path / "run"))
    result = train(cfg, model=copy.deepcopy(model), tokenizer=smollm2_tokenizer)
    validation = prepare_data(cfg, smollm2_tokenizer, 256, World(), print)[1]
    assert len(validation) == 6 if no_packing else len(validation) < 6  # packed: rows that hold several
    # by hand: each validation conversation alone, cross-entropy over the tokens after its assistant starts
    total, tokens = 0.0, 0
    for row in map(json.loads, open(chat_files[1])):
        text = smollm2_tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
        mask = torch.zeros(len(ids), dtype=torch.bool)
        for i, m in enumerate(row["messages"]):
            if m["role"] == "assistant":
                before = smollm2_tokenizer.apply_chat_template(row["messages"][:i], tokenize=False,
                                                               add_generation_prompt=True)
                through = smollm2_tokenizer.apply_chat_template(row["messages"][:i + 1], tokenize=False)
                lo = len(smollm2_tokenizer(before, add_special_tokens=False)["input_ids"])
                hi = len(smollm2_tokenizer(through, add_special_tokens=False)["input_ids"])
                mask[lo:hi] = True
        ids = torch.tensor(ids)[:256]
        with torch.no_grad():
            logits = model(ids[None]).logits[0, :-1]
        keep = mask[1:len(ids)]
        total += float(F.cross_entropy(logits[keep], ids[1:][keep], reduction="sum"))
        tokens += int(keep.sum())
    assert result["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["perplexity"] == pytest.approx(
        math.exp(total / tokens), rel=1e-5)


# ---------------------------------------------------------------- whole runs

def run_args(model, chat_files, out, cache, *extra) -> list[str]:
    """12 steps of 2 rows over the first 8 packed rows (3 epochs), fp32, evaluated at the end."""
    return ["--model", model, "--train-file", chat_files[0], "--validation-file", chat_files[1], "--block-size", "128",
            "--batch-size", "2", "--max-train-samples", "8", "--max-train-steps", "12", "--lr", "1e-3",
            "--precision", "fp32", "--log-every", "1", "--seed", "1", "--compile", "off", "--cache-dir", cache,
            "--output-dir", out, *map(str, extra)]


def test_a_killed_run_on_conversations_resumes_exactly(chat_files, tiny_llama, tmp_path):
    from test_resume import assert_same_weights, logged_losses, signalled_at

    cache = str(tmp_path / "cache")
    reference = run_script("clm", *run_args(tiny_llama, chat_files, tmp_path / "reference", cache))
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = run_args(tiny_llama, chat_files, tmp_path / "run", cache, "--save-every", "5")
    killed = run_script("clm", *args, env=signalled_at(7, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_script("clm", *args, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-5 at step 5" in resumed.stdout and "reusing tokenized conversations" in resumed.stdout
    assert_same_weights(tmp_path / "run", tmp_path / "reference")
    assert logged_losses(tmp_path / "run") == logged_losses(tmp_path / "reference")
    other = run_script("clm", *args, "--resume-from", "latest", "--loss-on", "all")
    assert other.returncode == 2 and "loss_on=None (now 'all')" in other.stderr


def test_two_processes_train_conversations_like_one(chat_files, tiny_llama, tmp_path):
    from test_distributed import ONE_THREAD, assert_same_weights, finish, torchrun

    cache = str(tmp_path / "cache")
    one = subprocess.run([sys.executable, str(ROOT / "train_clm.py"),
                          *run_args(tiny_llama, chat_files, tmp_path / "one", cache, "--max-train-steps", "3")],
                         cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # --standalone: the rendezvous listens on a port the system picks (one found free beforehand can be taken)
    out = finish(torchrun("--standalone", "--nproc_per_node", "2", script_args=[
        ROOT / "train_clm.py", *run_args(tiny_llama, chat_files, tmp_path / "two", cache, "--max-train-steps", "3",
                                         "--batch-size", "1")]))
    assert "x 2 processes" in out
    a, b = scalars(tmp_path / "one", "train/loss"), scalars(tmp_path / "two", "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-5)
    assert metrics(tmp_path / "two")["eval_loss"] == pytest.approx(metrics(tmp_path / "one")["eval_loss"], rel=1e-5)
    assert_same_weights(tmp_path / "one", tmp_path / "two", "clm")


def test_lora_adapters_train_on_conversations_and_sample_the_reply(chat_files, tiny_llama, tmp_path):
    out = tmp_path / "run"
    run = run_script("clm", *run_args(tiny_llama, chat_files, out, str(tmp_path / "cache"), "--max-train-steps",
                                      "4", "--lora-rank", "4", "--sample-every", "4"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert metrics(out)["perplexity"] < metrics(out)["perplexity_before"]
    samples = [line for line in run.stdout.splitlines() if line.startswith("sample at step 4:")]
    # the first validation conversation's opening turn, rendered up to the assistant's header
    first = json.loads(open(chat_files[1]).readline())["messages"][0]["content"]
    assert samples and samples[0].startswith("sample at step 4: '<|im_start|>system\\n")
    assert f"<|im_start|>user\\n{first}<|im_end|>\\n<|im_start|>assistant\\n' -> " in samples[0]


def test_the_chat_template_trained_with_is_saved_with_the_model_and_in_its_gguf(chat_files, tiny_llama, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    template = tmp_path / "plain.jinja"
    template.write_text("{%- for message in messages %}{{ '### ' + message['role'] + ':\\n' + message['content'] "
                        "+ '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '### assistant:\\n' }}{%- endif %}")
    out = tmp_path / "run"
    run = run_script("clm", *run_args(tiny_llama, chat_files, out, str(tmp_path / "cache"), "--max-train-steps", "1",
                                      "--chat-template", template, "--save-gguf", "f32"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert AutoTokenizer.from_pretrained(out).chat_template == template.read_text()
    assert GGUFReader(out / "model-f32.gguf").fields["tokenizer.chat_template"].contents() == template.read_text()


@pytest.mark.parametrize("extra, message", [
    (dict(task="mlm"), "the mlm objective has no per-token loss mask"),
    (dict(eval_stride=8), "--eval-stride slides windows over a stream of text"),
    (dict(loss_on="completion"), "--loss-on completion needs prompt/completion records"),
    (dict(chat_template="missing.jinja"), "--chat-template missing.jinja: no such file"),
])
def test_what_conversations_cannot_train_with_is_one_line_before_anything_loads(chat_files, extra, message):
    task = extra.pop("task", "clm")
    cfg = Config.for_task(task, train_file=chat_files[0], validation_file=chat_files[1], **extra)
    with pytest.raises(UsageError, match=message):
        load_sources(cfg)


def test_the_loop_does_not_know_about_conversations():
    # they enter through the data path and the objective's collator: fit and train_step stay as they are
    import re

    assert not re.search(r"chats?|conversations?|chat_template|loss_on", (ROOT / "lm" / "train.py").read_text())


def test_prompt_completion_rows_learn_the_completion_by_default(smollm2_tokenizer, tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}."} for i in range(20)]
    cfg = Config.for_task("clm", train_file=write_jsonl(tmp_path / "pc.jsonl", rows), block_size=128,
                          cache_dir=str(tmp_path / "cache"), no_packing=True, validation_split_percentage=10)
    train, validation = prepare_data(cfg, smollm2_tokenizer, 128, World(), print)
    assert (len(train), len(validation)) == (18, 2)  # the first 10% held out
    batch = CausalCollator(smollm2_tokenizer)([train[0]])
    assert smollm2_tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE]) == "It is 4.<|im_end|>\n"


def test_a_text_column_named_beside_messages_is_read_as_plain_text(tmp_path):
    # records holding both a conversation and a text: --text-column naming the text is the user's choice
    rows = [{**c, "body": f"plain text {i}"} for i, c in enumerate(conversations(10))]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    assert isinstance(load_sources(Config.for_task("clm", train_file=path))[0], Conversations)
    train, validation = load_sources(Config.for_task("clm", train_file=path, text_column="body"))
    assert sorted(train.texts + validation.texts) == sorted(r["body"] for r in rows)
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", rows)
    train, validation = load_sources(Config.for_task("clm", dataset=str(tmp_path / "hub"), text_column="body"))
    assert sorted(train.texts + validation.texts) == sorted(r["body"] for r in rows)
    # a column the records lack leaves them conversations (--text-column also reads --sample-prompts files)
    assert isinstance(load_sources(Config.for_task("clm", train_file=path, text_column="prompt"))[0], Conversations)


def test_a_dataset_with_a_messages_column_is_conversations_too(tmp_path):
    # a dataset directory loads as a Hub dataset does (datasets.load_dataset), offline
    write_jsonl(tmp_path / "train.jsonl", conversations(10))
    write_jsonl(tmp_path / "validation.jsonl", conversations(3, seed=1))
    train, validation = load_sources(Config.for_task("clm", dataset=str(tmp_path)))
    assert isinstance(train, Conversations) and len(train.conversations) == 10 and len(validation.conversations) == 3
    assert train.conversations[0] == conversations(10)[0]["messages"]

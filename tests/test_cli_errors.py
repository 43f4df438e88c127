"""Every mistake a user can make ends in one line on stderr, exit code 2, no traceback, nothing touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENV, ROOT, WORDS, run_script, tiny_model

# (id, task, arguments, what the message must say). Placeholders: {model} the tiny model of the task,
# {clm} / {mlm} either tiny model, {nomask} a model whose tokenizer has no mask token, {corpus} a good
# .txt, {data} a folder of bad files, {out} the output dir, {ckpt} a checkpoint of a finished clm run.
BASE = "--model {model} --train-file {corpus} --block-size 32 --output-dir {out}"
CASES = [
    ("missing-train-file", "clm", "--train-file {data}/nope.txt --output-dir {out}", "nope.txt: no such file"),
    ("train-file-is-a-directory", "clm", "--train-file {data}/folder.txt --output-dir {out}", "is a directory"),
    ("unreadable-train-file", "clm", "--train-file {data}/secret.txt --output-dir {out}", "not readable"),
    ("empty-train-file", "clm", "--train-file {data}/empty.txt --output-dir {out}", "the file is empty"),
    ("corpus-shorter-than-a-block", "clm",
     "--model {model} --train-file {data}/short.txt --validation-file {data}/short.txt --block-size 32 "
     "--output-dir {out}", "fewer than one block of 32; add text or lower --block-size"),
    ("not-utf8", "mlm", "--train-file {data}/latin1.txt --output-dir {out}", "not UTF-8 text (byte 3)"),
    ("block-size-zero", "clm", BASE + " --block-size 0", "--block-size must be positive, got 0"),
    ("block-size-negative", "mlm", BASE + " --block-size -8", "--block-size must be positive, got -8"),
    ("block-size-above-model", "clm", BASE + " --block-size 65", "--block-size 65 is above the model's maximum of 64"),
    ("mlm-prob-zero", "mlm", BASE + " --mlm-prob 0", "--mlm-prob must be between 0 and 1"),
    ("mlm-prob-one", "mlm", BASE + " --mlm-prob 1", "--mlm-prob must be between 0 and 1"),
    ("mlm-without-mask-token", "mlm", "--model {mlm} --tokenizer {nomask} --train-file {corpus} --output-dir {out}",
     "has no mask token, so it can't do masked LM"),
    ("line-by-line-with-clm", "clm", BASE + " --line-by-line", "--line-by-line is for masked LM only"),
    ("model-neither-dir-nor-reachable", "clm", "--model distilgpt2 --train-file {corpus} --output-dir {out}",
     "--model distilgpt2: not a directory, and the Hugging Face Hub is unreachable"),
    ("hub-dataset-offline", "clm", "--model {model} --dataset wikitext --output-dir {out}",
     "dataset 'wikitext' needs the Hugging Face Hub, which is unreachable"),
    ("text-column-missing-csv", "clm", "--model {model} --train-file {data}/posts.csv --output-dir {out}",
     "no column 'text' in every record (columns: body, id); choose one with --text-column"),
    ("text-column-missing-jsonl", "mlm",
     "--model {model} --train-file {data}/posts.jsonl --text-column content --output-dir {out}",
     "no column 'content' in every record (columns: body, id)"),
    ("resume-from-not-a-checkpoint", "clm", BASE + " --resume-from {data}", "not a checkpoint"),
    ("resume-from-latest-without-checkpoint", "clm", BASE + " --resume-from latest", "--resume-from latest: no checkpoint"),
    ("resume-from-other-model", "clm", "--model {mlm} --train-file {corpus} --block-size 32 --output-dir {out} "
     "--resume-from {ckpt}", "the checkpoint is of a different run: model="),
    ("resume-from-other-task", "mlm", "--model {clm} --train-file {corpus} --block-size 32 --output-dir {out} "
     "--resume-from {ckpt}", "the checkpoint is of a different run: task='clm' (now 'mlm')"),
    ("output-dir-holds-another-run", "clm", BASE, "holds another run (checkpoints): continue it with --resume-from latest"),
    ("batch-size-zero", "clm", BASE + " --batch-size 0", "--batch-size must be a positive integer, got 0"),
    ("batch-size-negative", "mlm", BASE + " --batch-size -2", "--batch-size must be a positive integer, got -2"),
    ("steps-zero", "clm", BASE + " --max-train-steps 0", "--max-train-steps must be a positive integer, got 0"),
    ("steps-negative", "mlm", BASE + " --max-train-steps -5", "--max-train-steps must be a positive integer"),
    ("lr-zero", "clm", BASE + " --lr 0", "--lr must be positive, got 0.0"),
    ("lr-negative", "mlm", BASE + " --lr -0.0001", "--lr must be positive, got -0.0001"),
    ("batch-size-not-a-number", "clm", BASE + " --batch-size two", "argument --batch-size: invalid int value: 'two'"),
    ("seed-negative", "mlm", BASE + " --seed -1", "--seed must be in [0, 2**32 - 1], got -1"),
    ("seed-too-large", "clm", BASE + " --seed 4294967296", "--seed must be in [0, 2**32 - 1], got 4294967296"),
    ("eval-only-resumes-nothing", "clm", BASE + " --eval-only --resume-from latest", "--eval-only evaluates --model"),
    ("hf-flag-we-lack", "clm", BASE + " --push_to_hub", "--push_to_hub is not supported: upload OUTPUT_DIR"),
    # model directories checked before anything is tokenized (a cache inside {out} would change it)
    ("gpt2-dir-without-tokenizer", "clm", "--model {bare}/gpt2 --train-file {corpus} --cache-dir {out}/cache "
     "--output-dir {out}", "/gpt2 holds no tokenizer (tokenizer.json, tokenizer_config.json, vocab.json, vocab.txt, "
     "...); save one there with tokenizer.save_pretrained, or name the tokenizer to use with --tokenizer DIR"),
    ("llama-dir-without-tokenizer", "clm", "--model {bare}/llama --train-file {corpus} --cache-dir {out}/cache "
     "--output-dir {out}", "/llama holds no tokenizer"),
    ("tokenizer-dir-without-tokenizer", "mlm", BASE + " --tokenizer {bare}/gpt2 --cache-dir {out}/cache",
     "--tokenizer {bare}/gpt2: the directory {bare}/gpt2 holds no tokenizer"),
    ("causal-model-for-masked-lm", "mlm", "--model {clm} --train-file {corpus} --cache-dir {out}/cache "
     "--output-dir {out}", "is a gpt2 model, which AutoModelForMaskedLM cannot load: this task needs another kind "
     "of model, such as the default (all-minilm-l6-v2)"),
    ("unknown-schedule", "clm", BASE + " --lr-scheduler reduce_lr_on_plateau", "invalid choice: 'reduce_lr_on_plateau'"),
    # a tokenizer or configuration that doesn't fit, or can't be read: named, before anything is tokenized
    ("tokenizer-beyond-the-embeddings", "clm", "--model {bare}/gpt2 --tokenizer {mlm} --train-file {corpus} "
     "--cache-dir {out}/cache --output-dir {out}", "the tokenizer {mlm} has 30,522 tokens, the model {bare}/gpt2 "
     "embeds 100: they don't belong together"),
    ("malformed-tokenizer-json", "clm", "--model {broken}/tokenizer --train-file {corpus} --cache-dir {out}/cache "
     "--output-dir {out}", "the tokenizer in {broken}/tokenizer could not be loaded (KeyError: 'added_tokens')"),
    ("inconsistent-config-json", "clm", "--model {broken}/config --train-file {corpus} --cache-dir {out}/cache "
     "--output-dir {out}", "the model configuration {broken}/config/config.json could not be loaded "
     "(StrictDataclassClassValidationError: Class validation error for validator 'validate_architecture': "
     "ValueError: The hidden size (64) is not a multiple of the number of attention heads (5).)"),
    ("causal-block-of-one-token", "clm", BASE + " --block-size 1", "--block-size 1 leaves a causal LM nothing to "
     "predict; use 2 or more"),
    ("model-dir-without-weights", "clm", "--model {broken}/weightless --train-file {corpus} --block-size 32 "
     "--output-dir {out}",
     "the model in {broken}/weightless could not be loaded (OSError: Error no file named model.safetensors"),
    # a model from scratch: its configuration checked before anything is tokenized
    ("model-type-the-task-cannot-load", "mlm", "--model-type gpt2 --tokenizer {mlm} --train-file {corpus} "
     "--cache-dir {out}/cache --output-dir {out}", "--model-type gpt2 is a gpt2 model, which AutoModelForMaskedLM "
     "cannot load"),
    ("config-override-of-no-field", "clm", "--config-name {clm} --config-overrides n_layers=1 --train-file {corpus} "
     "--cache-dir {out}/cache --output-dir {out}", "--config-overrides n_layers=1: GPT2Config has no field 'n_layers'"),
    # LoRA's settings
    ("lora-alpha-without-rank", "clm", BASE + " --lora-alpha 32", "--lora-alpha is a setting of LoRA adapters: give "
     "--lora-rank R too"),
    ("merge-lora-without-rank", "mlm", BASE + " --merge-lora", "--merge-lora is a setting of LoRA adapters"),
    ("lora-rank-negative", "clm", BASE + " --lora-rank -4", "--lora-rank must be >= 0 (0: no adapters), got -4"),
    ("lora-under-fsdp", "clm", BASE + " --lora-rank 8 --fsdp", "--fsdp with LoRA adapters is not supported"),
    ("lora-target-not-in-model", "clm", BASE + " --lora-rank 8 --lora-targets q_proj,c_attn --cache-dir {out}/cache",
     "--lora-targets: q_proj is not a layer of this model's body; its linear layers are c_attn, c_fc, c_proj"),
    ("lora-target-not-linear", "clm", BASE + " --lora-rank 8 --lora-targets c_attn,ln_1 --cache-dir {out}/cache",
     "--lora-targets: ln_1 is a LayerNorm, which LoRA can't adapt (it adapts linear, embedding and convolution "
     "layers); this model's linear layers are c_attn, c_fc, c_proj"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder of bad inputs."""
    path = tmp_path_factory.mktemp("bad-data")
    (path / "folder.txt").mkdir()
    (path / "secret.txt").write_text("hidden text\n")
    (path / "secret.txt").chmod(0)
    (path / "empty.txt").write_text("\n  \n")
    (path / "short.txt").write_text("a few words\n")
    (path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (path / "posts.csv").write_text("id,body\n1,first post\n2,second post\n")
    (path / "posts.jsonl").write_text('{"id": 1, "body": "first"}\n{"id": 2, "body": "second"}\n')
    return path


@pytest.fixture(scope="module")
def nomask_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 with a word-level tokenizer that has padding but no mask token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", ".", *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.cls_token_id = tokenizer.sep_token_id = None  # tiny_model reads them for bos/eos
    path = tmp_path_factory.mktemp("nomask")
    tiny_model("clm", tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clm_checkpoint(model_dirs, corpus, tmp_path_factory) -> Path:
    """A real checkpoint: one step of the tiny clm model."""
    out = tmp_path_factory.mktemp("clm-run")
    result = run_script("clm", "--model", model_dirs["clm"], "--train-file", corpus, "--block-size", 32,
                        "--max-train-steps", 1, "--save-every", 1, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    return out / "checkpoints" / "step-1"


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """A folder with tiny GPT-2 and Llama models saved without any tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("bare")
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(path / "gpt2")
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(path / "llama")
    return path


@pytest.fixture(scope="module")
def broken(model_dirs, tmp_path_factory) -> Path:
    """Model directories with a damaged file: tokenizer/ (tokenizer.json holds no tokenizer), config/ (64 hidden
    units and 5 heads: transformers' own check refuses it), weightless/ (no weights file)."""
    import json

    path = tmp_path_factory.mktemp("broken")
    shutil.copytree(model_dirs["clm"], path / "tokenizer")
    for name in os.listdir(path / "tokenizer"):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            os.unlink(path / "tokenizer" / name)
    (path / "tokenizer" / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    shutil.copytree(model_dirs["clm"], path / "config")
    (path / "config" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                              "num_attention_heads": 5}))
    shutil.copytree(model_dirs["clm"], path / "weightless")
    (path / "weightless" / "model.safetensors").unlink()
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")


@pytest.mark.parametrize("task, args, message", [
    pytest.param(*c[1:], id=c[0], marks=[AS_ROOT] if "secret" in c[2] else []) for c in CASES])
def test_bad_input_is_one_line_exit_2(task, args, message, request, data, model_dirs, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's earlier work\n")
    needs = lambda name: "{" + name + "}" in args  # build the slow fixtures only for the cases using them
    values = dict(model=model_dirs[task], clm=model_dirs["clm"], mlm=model_dirs["mlm"], corpus=corpus, data=data,
                  out=out, nomask=request.getfixturevalue("nomask_model") if needs("nomask") else None,
                  ckpt=request.getfixturevalue("clm_checkpoint") if needs("ckpt") else None,
                  bare=request.getfixturevalue("bare") if needs("bare") else None,
                  broken=request.getfixturevalue("broken") if needs("broken") else None)
    if request.node.callspec.id == "output-dir-holds-another-run":
        shutil.copytree(request.getfixturevalue("clm_checkpoint"), out / "checkpoints" / "step-1")
    before = snapshot(out)

    result = run_script(task, *args.format(**values).split(), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message.format(**values) in result.stderr
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted({p.split("/")[0] for p in before})


def test_error_lines_of_ranks_writing_at_once_stay_whole():
    # torchrun's ranks share one stderr, and an error every rank raises is said by each at the same moment; a line
    # written in two pieces (print: the text, then its newline) let the other's land inside it, seen in a 2-rank run
    code = ("import sys, time\nfrom lm.cli import fail\nfrom lm.errors import UsageError\n"
            "error = UsageError('stopped: ' + sys.argv[1] * 60)\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "for _ in range(5000):\n    fail(error)\n")
    read, write = os.pipe()
    at = str(time.time() + 5)  # both writing at once, after their imports
    ranks = [subprocess.Popen([sys.executable, "-c", code, rank, at], cwd=ROOT, env=ENV, stderr=write)
             for rank in "01"]
    os.close(write)
    with open(read) as pipe:
        lines = pipe.read().splitlines()
    assert [p.wait() for p in ranks] == [0, 0]
    assert len(lines) == 10000
    assert set(lines) == {f"error: stopped: {rank * 60}" for rank in "01"}

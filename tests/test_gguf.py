"""GGUF export (lm/gguf.py, --save-gguf): real files from 2-layer Llama, Qwen2, Qwen3 and GPT-2 models with SmolLM2's
byte-level BPE tokenizer, and a Llama with a SentencePiece tokenizer trained here as Llama 2's was, read back two
independent ways: transformers' own GGUF reader, and llama.cpp itself (through llama_cpp, where it is installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ENV, ROOT, run_script
from lm import gguf as export
from lm import gguf_vocab
from lm.errors import UsageError

# numbers, runs of spaces, newlines, tabs, punctuation and non-ASCII: where pre-tokenizations differ
TEXT = ("In 2024, 1234567 people   paid $3.50 each!\n\n  def f(x):\n\treturn x**2  # naïve café, 東京, Ωμέγα 🙂\n"
        "They'll say it's 12:30 -- OK?")
LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
NEEDS_LLAMA_CPP = pytest.mark.skipif(not LLAMA_CPP, reason="llama_cpp is not installed (the optional gguf-check "
                                     "extra: pip install -e '.[gguf-check]', which compiles llama.cpp)")


def configs(vocab: int) -> dict:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    small = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=256)
    return {
        # tied embeddings, grouped KV heads, and an MLP width (80) that isn't whole Q8_0 blocks of 32
        "llama": LlamaConfig(**small, intermediate_size=80, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**small, intermediate_size=128, tie_word_embeddings=False),  # Q/K/V biases, own head
        # a head_dim (128) other than hidden / heads; transformers' GGUF reader assumes 128 for Qwen3
        "qwen3": Qwen3Config(**small, intermediate_size=128, head_dim=128, tie_word_embeddings=True),
        # transformers' GGUF reader leaves GPT-2's positions at the default 1024
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_tokenizer) -> dict:
    """{architecture: saved model directory}: tiny models with fresh weights (scaled up, so that next-token choices
    are clear-cut) and the embedded SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM

    dirs = {}
    for arch, config in configs(len(smollm2_tokenizer)).items():
        torch.manual_seed(0)
        config.initializer_range = 0.2
        model = AutoModelForCausalLM.from_config(config)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        smollm2_tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_gguf(file):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def relative_rms(a, b) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


# --- transformers' reader -----------------------------------------------------------------------------------------

# The bound on a Q8_0 weight: a block of 32 is stored as int8 q = round(w / d) with d = max|w| / 127 in fp16, so
# |w - q d| <= d / 2 = max|w| / 254, plus fp16's rounding of d (2**-11 relative, on |q| d <= max|w|): below
# max|w| / 254 * 1.01 for every weight, with max|w| that of the whole tensor at most.
Q8_0_WEIGHT = 1.01 / 254
# The logits: rounding errors are uniform in [-d/2, d/2], an RMS of d / sqrt(12) = max / (127 sqrt 12) per weight:
# with a block's max about 2.5 times its RMS (32 normal draws), 0.6% of a weight matrix's RMS. About 15 matrices add
# theirs independently along the residual stream: ~2.2% of the logits' RMS expected; 5% is the bound.
Q8_0_LOGITS = 0.05
# f16 keeps 11 significant bits, bf16 8: a weight's relative rounding error is up to 2**-11 or 2**-8. The same ~15
# matrices give ~0.1% (f16) and ~0.9% (bf16) for weights this wide (initializer_range 0.2, chosen so that greedy
# choices are clear-cut); 1e-2 and 2e-2 are the bounds.
BF16_LOGITS = 2e-2
ROUNDED = {"f16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("arch, kind", [("llama", k) for k in export.TYPES]
                         + [(a, k) for a in ("qwen2", "qwen3", "gpt2") for k in ("f32", "q8_0")])
def test_transformers_reads_back_the_weights_and_logits(models, smollm2_tokenizer, arch, kind, tmp_path):
    written = export.export(models[arch], kind, tmp_path / f"model-{kind}.gguf", say=lambda *a, **k: None)
    original, loaded = load(models[arch]), load_gguf(written.path)
    theirs = dict(loaded.state_dict())
    for name, weight in original.state_dict().items():
        back = theirs[name]
        if kind == "f32" or weight.ndim == 1:  # norms and biases stay F32 in every type
            assert torch.equal(back, weight), name
        elif kind in ROUNDED:  # the file holds the rounded value, and the reader gives it back exactly
            assert torch.equal(back, weight.to(ROUNDED[kind]).float()), name
        else:
            widened = name.endswith("down_proj.weight") and arch == "llama"  # rows of 80: F16
            bound = weight.abs().max() * (2.0**-11 if widened else Q8_0_WEIGHT)
            assert (back - weight).abs().max() <= bound, name
    ids = smollm2_tokenizer(TEXT)["input_ids"]
    ours, read = logits(original, ids), logits(loaded, ids)
    if kind == "f32":
        assert torch.equal(read, ours)
    else:
        assert relative_rms(read, ours) < {"f16": 1e-2, "bf16": BF16_LOGITS, "q8_0": Q8_0_LOGITS}[kind]


def test_tensor_types_and_metadata(models, smollm2_tokenizer, tmp_path):
    from gguf import GGMLQuantizationType as Q, GGUFReader

    file = export.export(models["llama"], "q8_0", tmp_path / "m.gguf", say=lambda *a, **k: None).path
    reader = GGUFReader(file)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reads token_embd for both
    assert types["token_embd.weight"] == Q.Q8_0 and types["blk.0.attn_q.weight"] == Q.Q8_0
    assert types["blk.0.ffn_down.weight"] == Q.F16  # rows of 80 weights: not whole blocks of 32
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["output_norm.weight"] == Q.F32

    def value(key):
        field = reader.fields[key]
        return field.contents()

    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "gpt2"
    # transformers rebuilt the embedded tokenizer from its GGUF with GPT-2's byte-level regex, not SmolLM's digit
    # split: the name must say what this tokenizer does
    assert value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == len(smollm2_tokenizer) and tokens[1] == "<|im_start|>"
    assert value("tokenizer.ggml.token_type")[1] == 3  # CONTROL
    assert value("tokenizer.ggml.bos_token_id") == smollm2_tokenizer.bos_token_id
    assert value("tokenizer.ggml.eos_token_id") == smollm2_tokenizer.eos_token_id
    assert value("tokenizer.ggml.add_bos_token") is False  # SmolLM2's tokenizer adds no BOS
    assert value("tokenizer.chat_template") == smollm2_tokenizer.chat_template
    assert len(value("tokenizer.ggml.merges")) == len(json.loads(smollm2_tokenizer.backend_tokenizer.to_str())
                                                     ["model"]["merges"])
    assert value("llama.attention.head_count_kv") == 2 and value("llama.feed_forward_length") == 80


def test_llama3_rope_scaling_is_written_as_transformers_computes_it():
    """Llama 3.1's rope scaling: llama.cpp divides each rotary frequency by the rope_freqs tensor's entry."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=1024,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 256})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    model = __import__("transformers").LlamaForCausalLM(config)
    tensors = dict(export.gguf_tensors(model.state_dict(), config))
    divisors = torch.from_numpy(tensors["rope_freqs.weight"]).double()
    assert not torch.allclose(divisors, torch.ones_like(divisors))
    torch.testing.assert_close(plain / divisors, scaled.double(), rtol=1e-5, atol=0)


def variant(tokenizer, pre_tokenizer: dict, ignore_merges: bool = False):
    """The embedded tokenizer with another pre-tokenization (same vocabulary and merges): a real BPE tokenizer of
    the kind SmolLM2's original, Llama 3's or Qwen2's is."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = pre_tokenizer
    spec["model"]["ignore_merges"] = ignore_merges
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tokenizer.bos_token,
                                   eos_token=tokenizer.eos_token, unk_token=tokenizer.unk_token)
    fast.chat_template = tokenizer.chat_template
    return fast


def pre_tokenizer(steps: list[dict]) -> dict:
    """tokenizer.json's pre_tokenizer of these steps (ByteLevel's offsets setting, which only moves offsets, added)."""
    steps = [dict(step, trim_offsets=True) if step["type"] == "ByteLevel" else step for step in steps]
    return {"type": "Sequence", "pretokenizers": steps} if len(steps) > 1 else steps[0]


PRE_TOKENIZERS = {name: (pre_tokenizer(steps), ignore) for name, (steps, ignore) in gguf_vocab.PRE_TOKENIZERS.items()}


@pytest.mark.parametrize("name", list(PRE_TOKENIZERS))
def test_pre_tokenizer_names(smollm2_tokenizer, name):
    pre, ignore = PRE_TOKENIZERS[name]
    assert gguf_vocab.pre_tokenizer_name(variant(smollm2_tokenizer, pre, ignore)) == name


def test_unknown_pre_tokenization_and_other_tokenizers_are_refused(smollm2_tokenizer, tokenizer):
    whitespace = variant(smollm2_tokenizer, {"type": "Whitespace"})
    with pytest.raises(UsageError, match="not one llama.cpp is known to reproduce"):
        gguf_vocab.pre_tokenizer_name(whitespace)
    with pytest.raises(UsageError, match="BPE tokenizers"):
        gguf_vocab.pre_tokenizer_name(tokenizer)  # MiniLM's WordPiece


# --- SentencePiece-style tokenizers (Llama 2, TinyLlama) --------------------------------------------------------

@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """{"metaspace": a real SentencePiece BPE tokenizer trained on the project's docs with Llama 2's settings (bytes
    for unknown characters, digits split, text kept as written, a leading "▁") and read by transformers' LlamaTokenizer
    as TinyLlama's is; "legacy": the same vocabulary and merges prepared as tokenizer.json's older normalizer did}."""
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("sentencepiece")
    docs = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    (directory / "text.txt").write_text("".join(path.read_text() for path in docs))
    spm.SentencePieceTrainer.train(input=str(directory / "text.txt"), model_prefix=str(directory / "tokenizer"),
                                   model_type="bpe", vocab_size=2000, byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                                   minloglevel=2)
    metaspace = LlamaTokenizer.from_pretrained(directory, add_bos_token=True)
    spec = json.loads(metaspace.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    legacy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                     eos_token="</s>", unk_token="<unk>")
    return {"metaspace": metaspace, "legacy": legacy}


@pytest.fixture(scope="module")
def sentencepiece_llama(sentencepiece, tmp_path_factory):
    """A saved 2-layer Llama with the SentencePiece tokenizer (as TinyLlama: BOS 1, EOS 2, its own output layer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = sentencepiece["metaspace"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, initializer_range=0.2))
    path = tmp_path_factory.mktemp("sentencepiece-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# texts llama.cpp and a Metaspace tokenizer split alike: none starts with a space
SAME_TEXTS = (TEXT, "trailing   ", "\n\n\n", "\tindented", "x" * 40 + " 1 22 333 4444 55555")
# what SentencePiece itself and llama.cpp put a "▁" before: the start of a text, and what follows a special token
PREFIXED_TEXTS = (" leading space", "   three", "</s> after a special token</s>x")


def test_a_sentencepiece_tokenizer_is_written_as_llama_cpp_reads_one(sentencepiece_llama, sentencepiece, tmp_path):
    from gguf import GGUFReader, TokenType

    tokenizer = sentencepiece["metaspace"]
    written = export.export(sentencepiece_llama, "f16", tmp_path / "m.gguf", say=lambda *a, **k: None)
    fields = GGUFReader(written.path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.pre"].contents() == "default"
    assert "tokenizer.ggml.merges" not in fields  # llama.cpp merges by the pieces' scores
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert types[tokenizer.unk_token_id] == TokenType.UNKNOWN and types[tokenizer.bos_token_id] == TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == TokenType.BYTE and types[300] == TokenType.NORMAL
    # the piece a merge earlier in tokenizer.json's list makes scores higher
    scores = dict(zip(tokens, fields["tokenizer.ggml.scores"].contents()))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    made = list(dict.fromkeys(a + b for a, b in merges))
    assert len(made) > 1000 and all(scores[a] > scores[b] for a, b in zip(made, made[1:]))
    # the Metaspace tokenizer and llama.cpp part at a text's leading space: said on the export's line
    assert "starts with a space" in written.tokenizing and "special token" in written.tokenizing
    assert "note: llama.cpp tokenizes" in written.line()
    legacy = export.write(load(sentencepiece_llama), sentencepiece["legacy"], "f16", tmp_path / "legacy.gguf")
    assert legacy.tokenizing is None


def test_transformers_reads_a_sentencepiece_tokenizer_back_from_its_scores(sentencepiece_llama, sentencepiece, tmp_path):
    """transformers' GGUF reader rebuilds the merges from the scores alone: the same ids, and the same logits."""
    from transformers import AutoTokenizer

    tokenizer = sentencepiece["metaspace"]
    file = export.export(sentencepiece_llama, "f32", tmp_path / "m.gguf", say=lambda *a, **k: None).path
    back = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    for text in SAME_TEXTS + PREFIXED_TEXTS:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ids = tokenizer(TEXT)["input_ids"]
    assert torch.equal(logits(load_gguf(file), ids), logits(load(sentencepiece_llama), ids))


def test_a_sentencepiece_tokenizer_llama_cpp_would_split_otherwise_is_refused(sentencepiece):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    def edited(change):
        spec = json.loads(sentencepiece["metaspace"].backend_tokenizer.to_str())
        change(spec)
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))

    split = edited(lambda spec: spec["pre_tokenizer"].update(split=True))  # into words first: llama.cpp doesn't
    with pytest.raises(UsageError, match="not the SentencePiece one llama.cpp reproduces"):
        gguf_vocab.pre_tokenizer_name(split)
    # a merge left out: transformers would never join those two pieces, llama.cpp would
    dropped = edited(lambda spec: spec["model"]["merges"].pop(100))
    with pytest.raises(UsageError, match="never joins"):
        gguf_vocab.pre_tokenizer_name(dropped)


# --- the command line, training, errors ---------------------------------------------------------------------------

def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_save_gguf_after_training_writes_beside_the_checkpoint(models, corpus, tmp_path):
    out = tmp_path / "run"
    result = run_script("clm", "--model", models["llama"], "--train-file", corpus, "--max-train-steps", "2",
                        "--block-size", "32", "--precision", "fp32", "--compile", "off", "--save-gguf", "q8_0",
                        "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    file = out / "model-q8_0.gguf"
    assert f"GGUF q8_0: {file} (" in result.stdout and " MB" in result.stdout
    assert not list(out.glob("*.part"))
    trained = load(out)  # the checkpoint, trained: the file is that model
    ids = [1, 2, 3] + list(range(100, 140))
    assert relative_rms(logits(load_gguf(file), ids), logits(trained, ids)) < Q8_0_LOGITS


def test_the_module_converts_an_adapter_as_its_merged_model(models, corpus, tmp_path):
    out = tmp_path / "lora"
    result = run_script("clm", "--model", models["llama"], "--train-file", corpus, "--max-train-steps", "2",
                        "--block-size", "32", "--precision", "fp32", "--compile", "off", "--lora-rank", "4",
                        "--lr", "1e-2", "--merge-lora", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    for directory in (out, out / "merged"):  # the adapter, merged on the fly; the --merge-lora result
        converted = subprocess.run([sys.executable, "-m", "lm.gguf", str(directory), "--type", "f32"], cwd=ROOT,
                                   env=ENV, capture_output=True, text=True, timeout=300)
        assert converted.returncode == 0, converted.stderr[-3000:]
    ids = list(range(100, 140))
    merged = logits(load(out / "merged"), ids)
    alone = tmp_path / "alone"  # beside adapter_config.json, transformers would read the adapter's base instead
    alone.mkdir()
    shutil.copy(out / "model-f32.gguf", alone)
    assert torch.equal(logits(load_gguf(alone / "model-f32.gguf"), ids), merged)
    assert torch.equal(logits(load_gguf(out / "merged" / "model-f32.gguf"), ids), merged)
    assert not torch.equal(merged, logits(load(models["llama"]), ids))  # the adapter did change the model


def test_mlm_refuses_save_gguf():
    message = one_error_line(run_script("mlm", "--save-gguf", "q8_0"))
    assert "--save-gguf" in message and "causal" in message


def test_an_unsupported_architecture_is_refused_before_training(models, corpus, tmp_path):
    out = tmp_path / "opt"
    message = one_error_line(run_script("clm", "--model-type", "opt", "--tokenizer", models["llama"],
                                        "--train-file", corpus, "--save-gguf", "f16", "--output-dir", out))
    assert "Llama" in message and "Qwen2" in message and "GPT-2" in message and "opt" in message
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("arch, change", [("gpt2", dict(scale_attn_weights=False)),
                                           ("gpt2", dict(activation_function="relu")),
                                           ("llama", dict(hidden_act="gelu_pytorch_tanh")),
                                           ("qwen2", dict(hidden_act="gelu_pytorch_tanh")),
                                           ("qwen3", dict(hidden_act="gelu_pytorch_tanh"))])
def test_a_variant_llama_cpp_computes_otherwise_is_refused(arch, change):
    # llama.cpp would run such a file with GPT-2's attention scaling or a SiLU MLP: other logits, silently
    config = configs(64)[arch]
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(UsageError, match="variant llama.cpp's"):
        export.check_architecture(config)


def test_a_sliding_window_llama_cpp_ignores_is_refused():
    from transformers import Qwen2Config

    config = Qwen2Config(**{**configs(64)["qwen2"].to_dict(), "use_sliding_window": True, "sliding_window": 16,
                            "max_window_layers": 1, "layer_types": None})
    assert "sliding_attention" in config.layer_types  # the window is on: transformers slides it, llama.cpp would not
    with pytest.raises(UsageError, match="sliding window of 16 tokens"):
        export.check_architecture(config)
    export.check_architecture(configs(64)["qwen2"])  # without it: accepted
    config.sliding_window = config.max_position_embeddings  # a window as long as the context changes nothing
    export.check_architecture(config)


def test_a_tokenizer_llama_cpp_cant_reproduce_is_refused_before_training(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "wordpiece"
    message = one_error_line(run_script("clm", "--model", tiny_gpt2, "--train-file", corpus, "--save-gguf", "f16",
                                        "--output-dir", out))
    assert "BPE tokenizers" in message
    assert not (out / "config.json").exists()


def test_a_failed_write_is_one_error_line_and_leaves_the_checkpoint(models, corpus, tmp_path):
    out = tmp_path / "run"
    (out / "model-f32.gguf").mkdir(parents=True)  # something in the way of the final rename
    (out / "model-f32.gguf" / "x").write_text("")
    result = run_script("clm", "--model", models["gpt2"], "--train-file", corpus, "--max-train-steps", "1",
                        "--block-size", "32", "--compile", "off", "--save-gguf", "f32", "--output-dir", out)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.splitlines()[-1]  # after the run's own output: its last line, the one error line
    assert message.startswith("error: ") and result.stderr.count("error: ") == 1, result.stderr[-3000:]
    assert "could not write the GGUF file" in message and str(out / "model-f32.gguf") in message
    assert (out / "metrics.json").exists()
    load(out)  # the checkpoint is whole
    assert not list(out.glob("*.part"))


def test_a_full_disk_is_one_error_line_and_leaves_no_file(models, tmp_path):
    directory = tmp_path / "model"
    subprocess.run(["cp", "-r", str(models["qwen2"]), str(directory)], check=True)
    before = sorted(p.name for p in directory.iterdir())

    def small_disk():  # writes past 1 MB fail with EFBIG, as a full disk fails them with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = subprocess.run([sys.executable, "-m", "lm.gguf", str(directory), "--type", "q8_0"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert "could not write the GGUF file" in one_error_line(result)
    assert sorted(p.name for p in directory.iterdir()) == before
    load(directory)


def test_the_module_refuses_a_directory_without_a_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lm.gguf", str(tmp_path), "--type", "q8_0"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert "neither a model" in one_error_line(result)


# --- llama.cpp itself ---------------------------------------------------------------------------------------------

def llama(path, **kwargs):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False, **kwargs)


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("name", list(PRE_TOKENIZERS))
def test_llama_cpp_tokenizes_as_the_tokenizer_does(models, smollm2_tokenizer, name, tmp_path):
    from transformers import AutoModelForCausalLM

    pre, ignore = PRE_TOKENIZERS[name]
    tokenizer = variant(smollm2_tokenizer, pre, ignore)
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    file = export.write(model, tokenizer, "f16", tmp_path / "m.gguf").path
    vocab = llama(file)
    try:
        for text in (TEXT, " leading space", "trailing   ", "\n\n\n", "x" * 40 + " 1 22 333 4444 55555"):
            assert vocab.tokenize(text.encode(), add_bos=True, special=False) == tokenizer(text)["input_ids"], text
    finally:
        vocab.close()


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("kind", ["metaspace", "legacy"])
def test_llama_cpp_tokenizes_as_a_sentencepiece_tokenizer_does(sentencepiece_llama, sentencepiece, kind, tmp_path):
    """Both preparations on every text that starts with no space; the legacy one (a normalizer prepending "▁", as
    SentencePiece itself does) also on those that do, and after special tokens."""
    tokenizer = sentencepiece[kind]
    vocab = llama(export.write(load(sentencepiece_llama), tokenizer, "f16", tmp_path / "m.gguf").path)
    try:
        for text in SAME_TEXTS + (PREFIXED_TEXTS if kind == "legacy" else ()):
            theirs = vocab.tokenize(text.encode(), add_bos=True, special=True)
            assert theirs == tokenizer(text, add_special_tokens=True)["input_ids"], text
            if kind == "legacy":
                assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id
    finally:
        vocab.close()


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2"])
def test_llama_cpp_continues_and_scores_as_transformers(models, smollm2_tokenizer, arch, tmp_path):
    model = load(models[arch])
    prompt = smollm2_tokenizer("def main():\n    print(")["input_ids"]
    ours = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    f32 = llama(export.export(models[arch], "f32", tmp_path / "f32.gguf", say=print).path)
    try:
        theirs = [t for _, t in zip(range(8), f32.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True))]
    finally:
        f32.close()
    assert theirs == ours

    # perplexity of a text, each token scored given those before it, as our evaluation does
    ids = smollm2_tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(logits(model, ids)[:-1], torch.tensor(ids[1:]))
    f16 = llama(export.export(models[arch], "f16", tmp_path / "f16.gguf", say=print).path, logits_all=True)
    try:
        f16.eval(ids)
        scores = torch.tensor(np.array(f16.scores[:len(ids)]), dtype=torch.float32)
    finally:
        f16.close()
    theirs_loss = torch.nn.functional.cross_entropy(scores[:-1], torch.tensor(ids[1:]))
    assert abs(math.exp(theirs_loss) / math.exp(loss) - 1) < 0.01

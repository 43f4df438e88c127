"""Models from scratch: --model-type, --config-name and --config-overrides build a fresh model, initialised by its
architecture, that trains, saves, reloads and resumes like a loaded one."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import metrics, run_script
from lm import embedded
from lm.config import Config, parse_args
from lm.errors import UsageError
from lm.modeling import new_model, scratch_config
from lm.objectives import CLM
from lm.optim import build_optimizer
from lm.train import setup, train

# A 2-layer SmolLM2 (Llama) 64 wide: the embedded default's configuration, made small
TINY_SMOLLM2 = "num_hidden_layers=2,hidden_size=64,num_attention_heads=4,num_key_value_heads=2,intermediate_size=128"


def smollm2_config_path() -> tuple[str, dict]:
    return str(embedded.model_dir(embedded.SMOLLM2)), {}


def test_overrides_are_typed_by_the_fields_they_set():
    config = scratch_config(None, smollm2_config_path(), {"num_hidden_layers": "2", "rms_norm_eps": "1e-6",
                                                           "tie_word_embeddings": "false", "hidden_act": "gelu"})
    assert (config.num_hidden_layers, config.rms_norm_eps, config.tie_word_embeddings, config.hidden_act) == (
        2, 1e-6, False, "gelu")
    assert config.hidden_size == 576 and config.head_dim == 64  # the rest as the file states it
    # a model type's defaults are built with the overrides: fields derived from them follow (head_dim)
    llama = scratch_config("llama", None, {"hidden_size": "64", "num_attention_heads": "4"})
    assert (llama.hidden_size, llama.head_dim) == (64, 16)
    gpt2 = scratch_config("gpt2", None, {"hidden_size": "32", "n_layer": "1"})  # hidden_size is GPT-2's n_embd
    assert (gpt2.n_embd, gpt2.n_layer) == (32, 1)


@pytest.mark.parametrize("model_type, overrides, message", [
    ("llama", {"num_layers": "2"}, "LlamaConfig has no field 'num_layers'"),
    ("llama", {"num_hidden_layers": "two"}, "num_hidden_layers=two: num_hidden_layers is an integer$"),
    ("llama", {"tie_word_embeddings": "maybe"}, "tie_word_embeddings=maybe: tie_word_embeddings is true or false"),
    ("llama", {"hidden_size": "64", "num_attention_heads": "5"}, "not a multiple of the number of attention heads"),
    ("llama", {"hidden_size": "64", "num_attention_heads": "4", "num_key_value_heads": "3"},
     "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("llama", {"rope_parameters": "x"}, "rope_parameters is a dict, which KEY=VALUE can't set"),
    ("lama", {}, "--model-type lama: not a transformers model type"),
])
def test_a_bad_override_is_one_usage_error(model_type, overrides, message):
    with pytest.raises(UsageError, match=message) as error:
        scratch_config(model_type, None, overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--model", "m", "--config-name", "c"], "--model loads trained weights, --config-name starts from fresh ones"),
    (["--model-type", "llama", "--config-name", "c", "--tokenizer", "t"], "give one"),
    (["--config-overrides", "n_layer=2"], "give --model-type or --config-name too"),
    (["--model-type", "gpt2"], "--model-type gpt2 brings no tokenizer: name one with --tokenizer"),
    (["--model-type", "gpt2", "--tokenizer", "t", "--config-overrides", "n_layer"], "'n_layer' is not KEY=VALUE"),
    (["--config-name", "c", "--config-overrides", "n_layer=2,,"], "'' is not KEY=VALUE"),
    (["--config-name", "c", "--lora-rank", "8"], "LoRA adapts a trained model"),
    (["--config-name", "c", "--eval-only"], "--eval-only evaluates a trained --model"),
])
def test_settings_from_scratch_that_cannot_work_are_refused_before_anything_loads(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args("clm", argv)


@pytest.mark.parametrize("model_type, overrides, message", [
    ("llama", "hidden_size=64,num_attention_heads=4,num_key_value_heads=3,num_hidden_layers=2,intermediate_size=128",
     "--config-overrides hidden_size=64,num_attention_heads=4,num_key_value_heads=3,num_hidden_layers=2,"
     "intermediate_size=128: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    # no check of the configuration's catches this one: building the model does, when the memory plan builds it
    ("gpt2", "n_embd=10,n_head=3,n_layer=2", "--model-type gpt2 --config-overrides n_embd=10,n_head=3,n_layer=2: the "
     "model this configuration describes can't run (ValueError: `embed_dim` must be divisible by num_heads"),
])
def test_a_configuration_that_cannot_run_is_one_error_before_anything_is_tokenized(model_type, overrides, message,
                                                                                   tiny_gpt2, corpus, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    r = run_script("clm", "--model-type", model_type, "--config-overrides", overrides, "--tokenizer", tiny_gpt2,
                   "--train-file", corpus, "--block-size", 16, "--cache-dir", cache, "--output-dir", out, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {message}") and r.stderr.count("\n") == 1, r.stderr
    assert "warning" not in r.stdout + r.stderr
    assert not (cache / "tokens").exists() and not out.exists()  # nothing tokenized or written


def test_hf_spellings_of_the_options_from_scratch():
    argv = ["--model_type", "gpt2", "--config_overrides", "n_layer=2", "--tokenizer_name", "t"]
    cfg = parse_args("clm", argv)
    assert (cfg.model_type, cfg.config_overrides, cfg.tokenizer) == ("gpt2", "n_layer=2", "t")
    assert parse_args("clm", ["--config_name", "c"]).config_name == "c"


def test_fresh_weights_are_the_architectures_own_initialisation():
    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(3)
    ours = new_model(config, "AutoModelForCausalLM").state_dict()
    torch.manual_seed(3)
    theirs = GPT2LMHeadModel(config).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # GPT-2's init (normal, std 0.02), not torch.nn.Linear's default (uniform, ~1/sqrt(fan_in) = 0.18 here)
    assert ours["transformer.h.0.mlp.c_fc.weight"].std().item() == pytest.approx(0.02, rel=0.1)


def test_config_name_trains_from_scratch_saves_and_reloads_to_the_same_perplexity(corpus, tmp_path):
    out = tmp_path / "run"
    result = run_script("clm", "--config-name", embedded.SMOLLM2, "--config-overrides", TINY_SMOLLM2,
                        "--train-file", corpus, "--block-size", 32, "--max-train-steps", 4, "--lr", 3e-3,
                        "--precision", "fp32", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(out)
    vocab = 49152  # SmolLM2's tokenizer, saved beside the embedded configuration
    assert vocab / 2 < m["perplexity_before"] < 2 * vocab  # fresh weights predict ~uniformly
    assert m["perplexity"] < m["perplexity_before"] and m["model"] == f"{embedded.SMOLLM2} from scratch ({TINY_SMOLLM2})"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (2, 64, vocab)
    # the saved model evaluates to the perplexity the run ended with
    again = tmp_path / "again"
    result = run_script("clm", "--model", out, "--eval-only", "--train-file", corpus, "--block-size", 32,
                        "--precision", "fp32", "--output-dir", again)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(again)["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-5)


def test_the_memory_plan_sizes_the_model_the_run_builds_with_the_tokenizers_vocabulary(tiny_gpt2, corpus, tmp_path):
    # GPT-2's configuration embeds 50,257 tokens; the run resizes it to MiniLM's 30,522, and so must the plan
    settings = dict(model_type="gpt2", config_overrides="n_layer=2,n_embd=32,n_head=2,n_positions=64",
                    tokenizer=tiny_gpt2, train_file=str(corpus), block_size=32, batch_size=2, max_train_steps=1,
                    precision="fp32", compile="off")
    cfg = Config.for_task("clm", **settings, output_dir=str(tmp_path / "planned")).validated()
    run, _ = setup(cfg, CLM, None, None, build_optimizer)
    train(Config.for_task("clm", **settings, output_dir=str(tmp_path / "run")))
    params = list(AutoModelForCausalLM.from_pretrained(tmp_path / "run").parameters())  # tied weights once
    assert params[0].shape[0] == 30522
    assert (run.plan.parameters, run.plan.weights) == (sum(p.numel() for p in params), sum(p.nbytes for p in params))


def test_model_type_trains_with_the_tokenizers_vocabulary_and_resumes_exactly(tiny_gpt2, corpus, tmp_path):
    settings = dict(model_type="gpt2", config_overrides="n_layer=2,n_embd=32,n_head=2,n_positions=64",
                    tokenizer=tiny_gpt2, train_file=str(corpus), block_size=32, batch_size=2, max_train_steps=6,
                    lr=1e-3, precision="fp32", seed=5, compile="off")
    whole = train(Config.for_task("clm", **settings, output_dir=str(tmp_path / "whole")))
    assert math.log(30522) - 0.5 < math.log(whole["perplexity_before"]) < math.log(30522) + 0.5
    assert AutoConfig.from_pretrained(tmp_path / "whole").vocab_size == 30522  # MiniLM's, not GPT-2's 50257
    first = Config.for_task("clm", **settings, output_dir=str(tmp_path / "split"), save_every=3)
    train(first)
    resumed = train(Config.for_task("clm", **{**settings, "output_dir": str(tmp_path / "split"),
                                              "resume_from": str(tmp_path / "split" / "checkpoints" / "step-3")}))
    assert resumed["eval_loss"] == whole["eval_loss"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

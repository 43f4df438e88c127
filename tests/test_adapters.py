"""LoRA adapters (lm.adapters, peft's format): a fresh adapter changes nothing, training changes only the
adapters (and a fresh head), the saved adapter and the merged model give the trained model's logits,
and a run with adapters resumes exactly, on any number of processes."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from conftest import ROOT, metrics, minilm_tokenizer, run_script, scalars, tiny_model
from lm.adapters import add_adapters, linear_names
from lm.config import Config, find_objective
from lm.errors import UsageError
from lm.train import train
from test_resume import signalled_at

AUTO = {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM}


def lora_settings(model_dir, corpus, out, **extra) -> dict:
    """8 steps of rank-4 adapters on every linear layer of a tiny model, in fp32."""
    return dict(model=str(model_dir), train_file=str(corpus), block_size=16, batch_size=4, max_train_steps=8,
                lora_rank=4, precision="fp32", log_every=1, seed=3, output_dir=str(out), **extra)


def cli(settings: dict) -> list[str]:
    args = []
    for name, value in settings.items():
        args += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args


def batch(tokenizer, n: int = 3) -> torch.Tensor:
    return tokenizer(["the model reads a line of text"] * n, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_a_fresh_adapter_changes_no_logit(task, tokenizer):
    model = tiny_model(task, tokenizer).eval()
    x = batch(tokenizer)
    before = model(x).logits
    fresh = frozenset()
    wrapped, _ = add_adapters(model, Config.for_task(task, lora_rank=8), fresh)
    assert torch.equal(wrapped.eval()(x).logits, before)  # lora_B starts at zero


def test_every_linear_layer_of_the_body_gets_an_adapter_and_nothing_else(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    assert linear_names(tiny_model("clm", tokenizer)) == ["c_attn", "c_fc", "c_proj"]
    # BERT's head has a dense layer of its own: it is the head's, not the body's, and gets no adapter
    bert = tiny_model("mlm", tokenizer)
    assert linear_names(bert) == ["dense", "key", "query", "value"]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert linear_names(llama) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    wrapped, _ = add_adapters(bert, Config.for_task("mlm", lora_rank=2), frozenset())
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in wrapped.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 2 * 6 and not any("cls." in n for n in adapted)  # 6 linear layers per BERT layer


@pytest.fixture(scope="module")
def trained(model_dirs, corpus, tmp_path_factory):
    """A tiny model of each task trained with adapters in-process: (the model object as trained, its tokenizer,
    the base's weights before, the output dir). MLM's head is fresh (absent from the checkpoint), so it trains too."""
    runs = {}

    def get(task):
        if task not in runs:
            base = model_dirs[task]
            tokenizer = AutoTokenizer.from_pretrained(base)
            model = AUTO[task].from_pretrained(base)
            if task == "mlm":  # a checkpoint without its head, as the embedded MiniLM's
                body = tmp_path_factory.mktemp("headless")
                model.bert.save_pretrained(body)
                tokenizer.save_pretrained(body)
                base = body
            out = tmp_path_factory.mktemp(f"lora-{task}") / "run"
            before = {k: v.clone() for k, v in AUTO[task].from_pretrained(base).state_dict().items()}
            cfg = Config.for_task(task, **lora_settings(base, corpus, out, merge_lora=True))
            train(cfg)
            runs[task] = base, out, before
        return runs[task]

    return get


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_only_adapters_and_a_fresh_head_train(task, trained):
    base, out, before = trained(task)
    saved = PeftModel.from_pretrained(AUTO[task].from_pretrained(base), out)
    state = saved.get_base_model().state_dict()
    for name, value in before.items():  # the base's own tensors are untouched
        ours = state.get(name, state.get(name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")))
        if ours is not None and "cls.predictions" not in name:
            assert torch.equal(ours, value), name
    lora_b = [v for k, v in state.items() if ".lora_B." in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # every adapter moved from zero
    if task == "mlm":  # the fresh head is in the adapter file (that it trains: the test below)
        assert any(".modules_to_save." in k for k in state)


def test_a_fresh_head_trains_in_full_and_its_tied_decoder_stays_the_frozen_embeddings(model_dirs, corpus, tmp_path,
                                                                                      capsys):
    headless = tmp_path / "headless"  # a checkpoint without its head, as the embedded MiniLM's
    AutoModelForMaskedLM.from_pretrained(model_dirs["mlm"]).bert.save_pretrained(headless)
    AutoTokenizer.from_pretrained(model_dirs["mlm"]).save_pretrained(headless)
    seen = {}

    def loss(model):  # the objective's own loss module, around the run's model: kept to look at after training
        seen["model"] = model
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
        return find_objective("mlm").loss(model)

    train(Config.for_task("mlm", **dict(lora_settings(headless, corpus, tmp_path / "run"), max_train_steps=4)),
          loss=loss)
    model, before = seen["model"], seen["before"]
    copy = model.cls.predictions.modules_to_save["default"]  # peft's trainable copy of the head
    prefix = "cls.predictions.modules_to_save.default."
    moved = {n for n, p in copy.named_parameters(remove_duplicate=False) if not torch.equal(p, before[prefix + n])}
    # everything of the head but its decoder, which is the word embeddings: frozen, shared, unmoved
    assert moved == {n for n, _ in copy.named_parameters(remove_duplicate=False)} - {"decoder.weight"}
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert copy.decoder.weight is embeddings and not embeddings.requires_grad
    assert torch.equal(embeddings, before["bert.embeddings.word_embeddings.weight"])
    assert "LoRA adapters, lr 0.001; in full, the fresh cls.predictions)" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_the_saved_adapter_and_the_merged_model_give_the_trained_logits(task, trained, tokenizer, corpus):
    base, out, _ = trained(task)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    x = batch(tokenizer)
    adapter = PeftModel.from_pretrained(AUTO[task].from_pretrained(base), out).eval()
    merged = AUTO[task].from_pretrained(out / "merged").eval()  # plain transformers: no peft
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapter(x).logits, rtol=1e-5, atol=1e-5)
    # --model ADAPTER_DIR evaluates the trained model: the perplexity the run ended with
    again = train(Config.for_task(task, model=str(out), train_file=str(corpus), block_size=16,
                                  batch_size=4, seed=3, precision="fp32", eval_only=True, output_dir=str(out.parent / "e")))
    assert again["perplexity"] == pytest.approx(metrics(out)["perplexity"], rel=1e-6)


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_a_run_with_adapters_resumes_exactly(task, model_dirs, corpus, tmp_path):
    from safetensors.torch import load_file

    reference = run_script(task, *cli(lora_settings(model_dirs[task], corpus, tmp_path / "reference")))
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = cli(lora_settings(model_dirs[task], corpus, tmp_path / "run", save_every=3))
    killed = run_script(task, *args, env=signalled_at(5, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-3" / "model.pt")
    assert saved and all(".lora_" in name for name in saved)  # what trains, not the frozen model
    resumed = run_script(task, *args, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, theirs = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("run", "reference"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert scalars(tmp_path / "run", "train/loss") == scalars(tmp_path / "reference", "train/loss")
    other = run_script(task, *args[:-2], "--lora-rank", "8", "--resume-from", "latest", "--output-dir",
                       tmp_path / "run")
    assert other.returncode == 2 and "lora_rank=4 (now 8)" in other.stderr and other.stderr.count("\n") == 1


def test_adapters_train_alike_on_two_processes_and_compiled(no_dropout_models, corpus, tmp_path):
    from test_distributed import finish, torchrun

    model = no_dropout_models["clm"]
    one = lora_settings(model, corpus, tmp_path / "one", grad_accum_steps=2, compile="off")
    assert run_script("clm", *cli(one)).returncode == 0
    two = dict(one, batch_size=2, output_dir=str(tmp_path / "two"))
    finish(torchrun("--standalone", "--nproc_per_node", "2", script_args=[ROOT / "train_clm.py", *cli(two)]))
    compiled = dict(one, compile="on", output_dir=str(tmp_path / "compiled"))
    r = run_script("clm", *cli(compiled))
    assert r.returncode == 0, r.stderr[-3000:]
    reference = [v for _, v in scalars(tmp_path / "one", "train/loss")]
    for run in ("two", "compiled"):
        assert [v for _, v in scalars(tmp_path / run, "train/loss")] == pytest.approx(reference, rel=1e-5), run
    assert metrics(tmp_path / "compiled")["compiled"] and metrics(tmp_path / "two")["world_size"] == 2


def test_adapters_get_a_larger_default_learning_rate_and_say_why(tiny_gpt2, corpus, tmp_path):
    r = run_script("clm", *cli(dict(lora_settings(tiny_gpt2, corpus, tmp_path / "run"), max_train_steps=1)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lr 0.0002: LoRA's default, 10x full fine-tuning's" in r.stdout
    assert Config.for_task("clm", lora_rank=4, lr=1e-3).lr == 1e-3  # given: as given


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """A 2-layer Llama saved in fp32, with an untied head: embeddings, norms and head are tensors LoRA leaves alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-fp32")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def merged_in_bf16(llama_base, corpus, tmp_path_factory):
    """A LoRA run in bf16 (its frozen base kept in bf16) with --merge-lora: its output dir."""
    out = tmp_path_factory.mktemp("lora-bf16") / "run"
    cfg = Config.for_task("clm", **dict(lora_settings(llama_base, corpus, out, merge_lora=True), precision="bf16",
                                        max_train_steps=4))
    assert train(cfg)["precision"] == "bf16"
    return out


def test_the_merged_model_is_merged_into_the_fp32_base_not_its_bf16_copy(llama_base, merged_in_bf16, tokenizer):
    from safetensors.torch import load_file

    base, merged = load_file(llama_base / "model.safetensors"), load_file(merged_in_bf16 / "merged" / "model.safetensors")
    adapter = {k.removeprefix("base_model.model."): v
               for k, v in load_file(merged_in_bf16 / "adapter_model.safetensors").items()}
    config = json.loads((merged_in_bf16 / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    assert merged.keys() == base.keys()
    adapted = 0
    for name, weight in base.items():
        assert merged[name].dtype == torch.float32, name
        lora_a = adapter.get(name.replace(".weight", ".lora_A.weight"))
        if lora_a is None:  # embeddings, norms, head: the original, bit for bit
            assert torch.equal(merged[name], weight), name
        else:  # the fp32 W + the adapter's delta
            delta = adapter[name.replace(".weight", ".lora_B.weight")] @ lora_a * scale
            torch.testing.assert_close(merged[name], weight + delta, rtol=0, atol=1e-7)
            adapted += 1
    assert adapted == 2 * 7  # every linear layer of both layers
    x = batch(tokenizer)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base), merged_in_bf16).eval()
        ours = AutoModelForCausalLM.from_pretrained(merged_in_bf16 / "merged").eval()
        torch.testing.assert_close(ours(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def test_eval_only_merge_lora_merges_the_adapter_it_evaluates(merged_in_bf16, llama_base, corpus, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "converted"
    train(Config.for_task("clm", model=str(merged_in_bf16), train_file=str(corpus), block_size=16, batch_size=4,
                          precision="fp32", eval_only=True, merge_lora=True, output_dir=str(out)))
    ours, theirs = (load_file(d / "merged" / "model.safetensors") for d in (out, merged_in_bf16))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "merged" / "tokenizer_config.json").is_file()
    with pytest.raises(UsageError, match="new adapters .--lora-rank. are zero, with nothing to merge"):
        Config.for_task("clm", model=str(llama_base), lora_rank=4, eval_only=True, merge_lora=True)


def test_an_adapter_keeps_its_own_settings_and_refuses_others(tiny_gpt2, corpus, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2),
                   LoraConfig(r=2, lora_alpha=8, target_modules=["c_proj", "c_attn"])).save_pretrained(adapter)
    settings = dict(model=str(adapter), train_file=str(corpus), block_size=16, batch_size=4, precision="fp32",
                    eval_only=True, output_dir=str(tmp_path / "out"))
    for given, flags in [(dict(lora_alpha=64), "--lora-alpha"), (dict(lora_dropout=0.5), "--lora-dropout"),
                         (dict(lora_targets="c_attn"), "--lora-targets"),
                         (dict(lora_alpha=64, lora_targets="c_attn,c_proj"), "--lora-alpha")]:
        with pytest.raises(UsageError) as error:
            train(Config.for_task("clm", **settings, **given))
        assert str(error.value) == (f"--model {adapter} holds a LoRA adapter, which keeps its own settings "
                                    f"(--lora-alpha 8, --lora-dropout 0, --lora-targets c_attn,c_proj): drop {flags}")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    # its own values, given again, are no change
    assert train(Config.for_task("clm", **settings, lora_alpha=8, lora_targets="c_attn,c_proj"))["perplexity"] > 0

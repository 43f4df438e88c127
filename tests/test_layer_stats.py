"""--log-layers: which part each parameter belongs to, the statistics against their definitions, and a run that logs
them and trains exactly as one that doesn't."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, \
    LlamaForCausalLM

from conftest import scalars
from lm.config import Config
from lm.layer_stats import after_step, before_step, model_parts
from lm.train import train


def gpt2(n_layer: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2))


def part_of(model) -> dict[str, str]:
    parts = model_parts(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: parts.names[i] for p, i in zip(parts.params, parts.index.tolist())}


def test_parts_are_the_embeddings_each_layer_and_the_head():
    part = part_of(gpt2())
    assert part["transformer.wte.weight"] == part["transformer.wpe.weight"] == "embeddings"  # lm_head tied to wte
    assert part["transformer.h.1.mlp.c_fc.weight"] == "layer.1" and part["transformer.ln_f.weight"] == "head"
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32))
    part = part_of(bert)
    assert part["bert.embeddings.LayerNorm.weight"] == "embeddings" and part["cls.predictions.bias"] == "head"
    assert sorted(set(part.values())) == ["embeddings", "head", "layer.0", "layer.1"]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                                         num_attention_heads=2))
    assert model_parts(llama).names == ("embeddings", *(f"layer.{i:02d}" for i in range(12)), "head")
    llama.model.embed_tokens.weight.requires_grad_(False)  # only what trains has statistics
    assert model_parts(llama).names[0] == "layer.00"


def test_statistics_are_the_norms_and_the_update_over_the_weights():
    model, lr = gpt2(), 0.1
    model(torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
    parts = model_parts(model)
    grads = {name: torch.cat([p.grad.flatten() for p, i in zip(parts.params, parts.index) if parts.names[i] == name])
             for name in parts.names}
    weights = {name: torch.cat([p.detach().flatten() for p, i in zip(parts.params, parts.index)
                                if parts.names[i] == name]) for name in parts.names}
    before = before_step(parts)
    torch.optim.SGD(model.parameters(), lr=lr).step()  # plain SGD: the update is lr x the gradient
    stats = after_step(parts, before)
    for name in parts.names:
        assert stats["grad_norm"][name] == pytest.approx(grads[name].norm().item(), rel=1e-5)
        assert stats["weight_norm"][name] == pytest.approx(weights[name].norm().item(), rel=1e-5)
        assert stats["update_ratio"][name] == pytest.approx(lr * grads[name].norm().item()
                                                            / weights[name].norm().item(), rel=1e-4)


def test_a_run_logs_every_part_and_trains_as_one_that_does_not(no_dropout_models, corpus, tmp_path):
    runs = {}
    for name, log_layers in (("plain", False), ("watched", True)):
        runs[name] = tmp_path / name
        train(Config.for_task("clm", model=str(no_dropout_models["clm"]), train_file=str(corpus), block_size=32,
                              batch_size=2, max_train_steps=5, log_every=2, log_layers=log_layers, lr=1e-3,
                              precision="fp32", compile="off", output_dir=str(runs[name])))
    a, b = (AutoModelForCausalLM.from_pretrained(runs[name]).state_dict() for name in ("plain", "watched"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    parts = ("embeddings", "layer.0", "layer.1", "head")
    for stat in ("grad_norm", "weight_norm", "update_ratio"):
        for part in parts:
            assert [s for s, _ in scalars(runs["watched"], f"{stat}/{part}")] == [2, 4, 5], (stat, part)
    assert scalars(runs["plain"], "grad_norm/layer.0") == []
    # the parts' gradient norms add up (in squares) to the one that is clipped
    for step, total in scalars(runs["watched"], "train/grad_norm"):
        squares = sum(dict(scalars(runs["watched"], f"grad_norm/{part}"))[step] ** 2 for part in parts)
        assert squares ** 0.5 == pytest.approx(total, rel=1e-5)

"""Numerics and compute options end to end: bf16 autocast, gradient checkpointing, torch.compile."""

import math

import pytest
import torch

from safetensors.torch import load_file

from conftest import metrics, run_script, scalars
from lm.config import Config


def common(model_dir, corpus, out, *extra):
    return ["--model", model_dir, "--train-file", corpus, "--block-size", "16", "--max-train-steps", "4",
            "--log-every", "1", "--lr", "1e-3", "--output-dir", out, *extra]


def losses(out):
    return [v for _, v in scalars(out, "train/loss")]


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_bf16_trains_with_finite_losses_and_saves_fp32_weights(task, model_dirs, corpus, tmp_path):
    r = run_script(task, *common(model_dirs[task], corpus, tmp_path / "bf16", "--precision", "bf16"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = metrics(tmp_path / "bf16")
    assert m["precision"] == "bf16" and math.isfinite(m["eval_loss"])
    assert all(math.isfinite(v) for v in losses(tmp_path / "bf16"))
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    # the same short run in fp32: bf16 lands within 2% in perplexity
    assert run_script(task, *common(model_dirs[task], corpus, tmp_path / "fp32", "--precision", "fp32")).returncode == 0
    assert m["perplexity"] == pytest.approx(metrics(tmp_path / "fp32")["perplexity"], rel=0.02)


def test_gradient_checkpointing_changes_memory_not_the_maths(model_dirs, corpus, tmp_path):
    base = common(model_dirs["clm"], corpus, tmp_path / "plain", "--precision", "fp32")
    assert run_script("clm", *base).returncode == 0
    r = run_script("clm", *common(model_dirs["clm"], corpus, tmp_path / "ckpt", "--precision", "fp32",
                                  "--gradient-checkpointing"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)


@pytest.mark.parametrize("task, precision, rel", [("clm", "fp32", 1e-5), ("mlm", "fp32", 1e-5), ("clm", "bf16", 0.02)])
def test_compile_matches_eager_and_saves_plain_names(task, precision, rel, no_dropout_models, corpus, tmp_path):
    # no dropout: compiled code draws its random numbers differently. MLM: a varying count of masked
    # positions, padded to a few shapes for the compiled head. bf16: within the bf16-vs-fp32 tolerance.
    # CLM samples between steps (no_grad, prompts of every length): they run eagerly, so nothing recompiles.
    model = no_dropout_models[task]
    eager = common(model, corpus, tmp_path / "eager", "--precision", precision, "--compile", "off")
    assert run_script(task, *eager).returncode == 0
    sampling = ["--sample-every", "2"] if task == "clm" else []
    r = run_script(task, *common(model, corpus, tmp_path / "compiled", "--precision", precision, "--compile",
                                 "--save-every", "4", *sampling), env={"TORCH_LOGS": "recompiles"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compile on" in r.stdout and metrics(tmp_path / "compiled")["compiled"]
    assert "Graph break" not in r.stderr  # no Dynamo warnings for a user to puzzle over
    assert "Recompiling" not in r.stderr, r.stderr[-3000:]  # each layer's graph compiled once for the whole run
    assert r.stdout.count("sample at step") == (6 if sampling else 0)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=rel)
    saved = torch.load(tmp_path / "compiled" / "checkpoints" / "step-4" / "model.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in saved)
    assert not any("_orig_mod" in k for k in load_file(tmp_path / "compiled" / "model.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, fp16 is allowed")
def test_fp16_without_cuda_is_a_one_line_error(model_dirs, corpus, tmp_path):
    r = run_script("clm", *common(model_dirs["clm"], corpus, tmp_path / "fp16", "--precision", "fp16"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "fp16 needs a CUDA GPU" in r.stderr and "bf16" in r.stderr


def test_compile_leaves_the_fused_head_loss_out_of_its_graphs():
    # Traced by Dynamo, the fused head + loss (gradients made in its forward) gave all-zero gradients
    # on CUDA: compiled CLM runs did not learn. It must run eagerly between the compiled graphs.
    from transformers import GPT2Config, GPT2LMHeadModel

    from lm.losses import TokenLoss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    ids = torch.randint(0, 97, (2, 8))
    labels = ids.clone()
    labels[:, 0] = -100
    torch._dynamo.reset()
    loss = torch.compile(TokenLoss(model), backend=record)(ids, torch.ones_like(ids), labels)
    loss.backward()
    assert graphs and any("transformer" in g or "wte" in g for g in graphs)  # the model body was compiled
    assert not any("logsumexp" in g for g in graphs)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.norm()) for g in grads) > 0


def test_compile_auto_with_no_estimate_compiles_to_measure_then_keeps_what_it_gained(no_dropout_models, corpus,
                                                                                     tmp_path):
    # fp32 on a CPU: no estimate of what compiling saves. A cache that says compiling this model costs nothing (as a
    # --compile on run leaves it: no eager steps, no gain): auto compiles after 3 eager steps to measure the gain,
    # times 3 compiled steps (after 3 settling) against the eager ones, and keeps it for the next run's decision.
    import json

    from transformers import AutoConfig

    from lm.compiling import COMPILE_CACHE, compile_key
    from test_compiling import probed

    model, cache = no_dropout_models["clm"], probed(tmp_path / "cache")
    key = compile_key(torch.device("cpu"), "fp32", AutoConfig.from_pretrained(model), Config.for_task("clm"), 16)
    (cache / COMPILE_CACHE).write_text(json.dumps({key: {"seconds": 0.0, "compiles": 2}}))
    extra = ["--precision", "fp32", "--max-train-steps", "10", "--cache-dir", cache]  # 3 eager, 3 settling, 3 timed
    assert run_script("clm", *common(model, corpus, tmp_path / "eager", *extra, "--compile", "off")).returncode == 0
    r = run_script("clm", *common(model, corpus, tmp_path / "auto", *extra))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compile on, to measure what it saves here: ~0 s of compiling against ~" in r.stdout
    assert "compile: steps " in r.stdout and metrics(tmp_path / "auto")["compiled"]
    measured = json.loads((cache / COMPILE_CACHE).read_text())[key]
    assert measured["measurements"] == 1 and measured["compiles"] == 3 and "gain" in measured  # this machine's
    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)

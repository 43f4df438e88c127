"""torch.compile can't stop a run: a probe that builds a real kernel before --compile on trains, auto that
stays eager where it can't build, and a compile that fails mid-run going back to eager (or one error line)."""

import json
import os

import pytest
import torch
from transformers import AutoConfig

from conftest import metrics, run_script, scalars
from lm.compiling import COMPILE_CACHE, PROBE_CACHE, compile_key, compile_probe_key
from lm.config import Config


@pytest.fixture
def broken_compiler(tmp_path, monkeypatch):
    """PATH with a g++ first that exits 1, as a compiler without what it needs would: (env for runs, PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "g++").write_text("#!/bin/sh\necho 'g++: fatal error: cannot build' >&2\nexit 1\n")
    (bin_dir / "g++").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    monkeypatch.setenv("PATH", path)  # so that compile_probe_key sees what the runs will see
    return {"PATH": path, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # nothing cached: it must build


def args(model_dir, corpus, out, cache, *extra):
    return ["--model", model_dir, "--train-file", corpus, "--block-size", "16", "--max-train-steps", "10",
            "--log-every", "1", "--lr", "1e-3", "--precision", "fp32", "--output-dir", out, "--cache-dir", cache,
            *extra]


def probed(cache):
    """`cache` holding the probe's answer that kernels build here, as a run leaves it: the runs of a test that is
    not about the probe skip its child process (a cold compile of its own, ~15 s); where none builds, they fail
    anyway."""
    cache.mkdir(exist_ok=True)
    (cache / PROBE_CACHE).write_text(json.dumps({compile_probe_key(torch.device("cpu")): {"ok": 1}}))
    return cache


def paying(cache, model_dir) -> None:
    """A compile cache that says compiling this model costs nothing and saves half of each step."""
    key = compile_key(torch.device("cpu"), "fp32", AutoConfig.from_pretrained(model_dir), Config.for_task("clm"), 16)
    cache.mkdir(exist_ok=True)
    (cache / COMPILE_CACHE).write_text(json.dumps({key: {"seconds": 0.0, "gain": 0.5, "compiles": 2, "measurements": 2}}))


def test_compile_on_where_no_kernel_builds_is_one_line_before_any_work(broken_compiler, tiny_gpt2, corpus, tmp_path):
    cache = tmp_path / "cache"
    r = run_script("clm", *args(tiny_gpt2, corpus, tmp_path / "run", cache, "--compile", "on"), env=broken_compiler)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: torch.compile could not build a test kernel here (InductorError: "
                               "InvalidCxxCompiler") and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.rstrip().endswith("; or drop --compile")
    assert not (cache / "tokens").exists() and not (tmp_path / "run").exists()  # refused before tokenizing


def test_auto_stays_eager_where_no_kernel_builds(broken_compiler, no_dropout_models, corpus, tmp_path):
    model, cache = no_dropout_models["clm"], tmp_path / "cache"
    paying(cache, model)
    r = run_script("clm", *args(model, corpus, tmp_path / "run", cache), env=broken_compiler)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compile off: torch.compile could not build a test kernel here (InductorError" in r.stdout
    assert not metrics(tmp_path / "run")["compiled"]
    assert compile_probe_key(torch.device("cpu")) not in json.loads((cache / PROBE_CACHE).read_text()
                                                                    if (cache / PROBE_CACHE).exists() else "{}")


@pytest.fixture
def stale_probe(broken_compiler, tmp_path):
    """A cache whose probe entry says kernels build here, though the compiler is broken since."""
    return probed(tmp_path / "cache")


def test_a_compile_that_fails_mid_run_goes_back_to_eager_under_auto(broken_compiler, stale_probe, no_dropout_models,
                                                                     corpus, tmp_path):
    model = no_dropout_models["clm"]
    paying(stale_probe, model)
    eager = run_script("clm", *args(model, corpus, tmp_path / "eager", stale_probe, "--compile", "off"))
    assert eager.returncode == 0, eager.stderr[-3000:]
    r = run_script("clm", *args(model, corpus, tmp_path / "auto", stale_probe), env=broken_compiler)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compile on: ~" in r.stdout  # decided after step 3 ...
    assert "compile failed at step 4 (InductorError: InvalidCxxCompiler" in r.stderr  # ... failed building step 4
    assert "eager from here" in r.stderr and "Traceback" not in r.stderr
    assert not metrics(tmp_path / "auto")["compiled"]
    # step 4 ran again eagerly, from the same weights: the run is the eager one, loss for loss
    ours, theirs = (scalars(tmp_path / run, "train/loss") for run in ("auto", "eager"))
    assert [s for s, _ in ours] == list(range(1, 11))
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=1e-6)


def test_a_compile_that_fails_under_compile_on_is_one_line(broken_compiler, stale_probe, tiny_gpt2, corpus, tmp_path):
    r = run_script("clm", *args(tiny_gpt2, corpus, tmp_path / "run", stale_probe, "--compile", "on"),
                   env=broken_compiler)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: torch.compile failed at step 1 (InductorError: InvalidCxxCompiler")
    assert last.endswith("; run with --compile off") and "Traceback" not in r.stderr


def test_eval_only_compiles_nothing_and_says_so(broken_compiler, tiny_gpt2, corpus, tmp_path):
    # evaluation runs eagerly: --compile on has nothing to compile, needs no compiler, and records no compiled step
    r = run_script("clm", *args(tiny_gpt2, corpus, tmp_path / "run", tmp_path / "cache", "--compile", "on",
                                "--eval-only"), env=broken_compiler)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compile off" in r.stdout and metrics(tmp_path / "run")["compiled"] is False


def test_the_probe_builds_a_kernel_once_and_keeps_only_successes(tmp_path, broken_compiler, monkeypatch):
    from lm.compiling import compile_probe

    assert "InvalidCxxCompiler" in compile_probe(torch.device("cpu"), tmp_path)
    assert not (tmp_path / PROBE_CACHE).exists()  # a failure is not kept: installing the fix is seen next run
    monkeypatch.setenv("PATH", broken_compiler["PATH"].split(os.pathsep, 1)[1])  # the real compiler again
    assert compile_probe(torch.device("cpu"), tmp_path) is None
    assert list(json.loads((tmp_path / PROBE_CACHE).read_text()).values())[0]["ok"] == 1


def test_inductor_writes_under_the_run_s_cache_dir_alone(no_dropout_models, corpus, tmp_path, monkeypatch):
    # Inductor touched first (it then writes its default into the environment): the runs still compile into
    # their own --cache-dir, a second train() in the same process into its own, and the variable is put back
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from lm.train import train

    default = tmp_path / "default"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(default))
    assert cache_dir() == str(default)
    for name in ("first", "second"):
        cfg = Config.for_task("clm", model=str(no_dropout_models["clm"]), train_file=str(corpus), block_size=16,
                              max_train_steps=2, precision="fp32", compile="on", cache_dir=str(probed(tmp_path / name)),
                              output_dir=str(tmp_path / f"run-{name}"))
        train(cfg)
        assert any((tmp_path / name / "inductor").rglob("*.py")), name  # Inductor's generated code
    assert not default.exists() or not any(default.rglob("*.py"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(default)


def test_a_resumed_auto_run_compiles_where_the_uninterrupted_one_did(no_dropout_models, corpus, tmp_path):
    # auto compiles after step 3 (the cache says it pays); a checkpoint of step 5 resumes compiled at once, so
    # steps 6-8 run the same compiled code as the uninterrupted run's: bitwise the same weights in fp32
    from safetensors.torch import load_file

    from test_resume import signalled_at

    model, cache = no_dropout_models["clm"], probed(tmp_path / "cache")
    paying(cache, model)
    extra = ["--max-train-steps", "8", "--save-every", "5"]
    whole = run_script("clm", *args(model, corpus, tmp_path / "whole", cache), *extra)
    assert whole.returncode == 0 and "compile on: ~" in whole.stdout, whole.stderr[-3000:]
    assert metrics(tmp_path / "whole")["compiled_since"] == 3
    killed = run_script("clm", *args(model, corpus, tmp_path / "run", cache), *extra, env=signalled_at(7, "SIGKILL"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_script("clm", *args(model, corpus, tmp_path / "run", cache), *extra, "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "compile on" not in resumed.stdout  # not decided again: compiled since step 3, as the checkpoint says
    assert metrics(tmp_path / "run")["compiled_since"] == 3 and metrics(tmp_path / "run")["compiled"]
    ours, theirs = (load_file(tmp_path / run / "model.safetensors") for run in ("run", "whole"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

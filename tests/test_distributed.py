"""torchrun on CPU/gloo: 2 processes x batch 2 train exactly like 1 process x batch 4."""

import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from conftest import ENV, ROOT, metrics, scalars

AUTO = {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(task, model_dir, corpus, out, batch_size):
    # 16 blocks, global batch 4 with 2 micro-batches per step: 2 steps an epoch, 6 steps in all
    return [ROOT / f"train_{task}.py", "--model", model_dir, "--train-file", corpus, "--block-size", "16",
            "--max-train-samples", "16", "--batch-size", batch_size, "--grad-accum-steps", "2", "--epochs", "3",
            "--log-every", "1", "--precision", "fp32", "--lr", "1e-3", "--warmup-steps", "2",
            "--output-dir", out]


def torchrun(*extra, script_args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, *map(str, script_args)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def assert_same_training(single, multi, task):
    a, b = scalars(single, "train/loss"), scalars(multi, "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5)
    assert metrics(multi)["eval_loss"] == pytest.approx(metrics(single)["eval_loss"], rel=1e-5)
    sa, sb = AUTO[task].from_pretrained(single).state_dict(), AUTO[task].from_pretrained(multi).state_dict()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_two_processes_equal_one_with_the_same_global_batch(task, no_dropout_models, corpus, tmp_path):
    single = subprocess.run([sys.executable, *map(str, args(task, no_dropout_models[task], corpus, tmp_path / "one", 4))],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    out = finish(torchrun("--standalone", "--nproc_per_node", "2",
                          script_args=args(task, no_dropout_models[task], corpus, tmp_path / "two", 2)))
    assert "x 2 processes" in out
    assert_same_training(tmp_path / "one", tmp_path / "two", task)
    assert metrics(tmp_path / "two")["world_size"] == 2


def test_two_nodes_by_rendezvous_equal_one_process(no_dropout_models, corpus, tmp_path):
    port = free_port()
    nodes = [torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lm-test",
                      script_args=args("clm", no_dropout_models["clm"], corpus, tmp_path / "nodes", 2))
             for rank in (0, 1)]
    for node in nodes:
        finish(node)
    single = subprocess.run([sys.executable, *map(str, args("clm", no_dropout_models["clm"], corpus, tmp_path / "one", 4))],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "nodes", "clm")


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_fsdp_trains_like_one_process_and_saves_a_whole_model(task, no_dropout_models, corpus, tmp_path):
    single = subprocess.run([sys.executable, *map(str, args(task, no_dropout_models[task], corpus, tmp_path / "one", 4))],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    finish(torchrun("--standalone", "--nproc_per_node", "2",
                    script_args=[*args(task, no_dropout_models[task], corpus, tmp_path / "fsdp", 2), "--fsdp"]))
    assert_same_training(tmp_path / "one", tmp_path / "fsdp", task)  # from_pretrained loads the gathered model


def test_fsdp_checkpoint_resumes(no_dropout_models, corpus, tmp_path):
    run = [*args("clm", no_dropout_models["clm"], corpus, tmp_path / "fsdp", 2), "--fsdp", "--save-every", "3"]
    finish(torchrun("--standalone", "--nproc_per_node", "2", script_args=run))
    # throw away the finished model and resume from step 3: the last 3 steps again, the same result
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").state_dict()
    finish(torchrun("--standalone", "--nproc_per_node", "2",
                    script_args=[*run, "--resume-from", tmp_path / "fsdp" / "checkpoints" / "step-3"]))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").state_dict()
    for name in final:
        torch.testing.assert_close(again[name], final[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fsdp_needs_torchrun(no_dropout_models, corpus, tmp_path):
    r = subprocess.run([sys.executable, *map(str, args("clm", no_dropout_models["clm"], corpus, tmp_path / "x", 4)),
                        "--fsdp"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr

"""torchrun on CPU/gloo: 2 processes x batch 2 train exactly like 1 process x batch 4."""

import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from conftest import ENV, NEEDS_MUON, ROOT, metrics, scalars
from test_resume import signalled_at

AUTO = {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM}


def args(task, model_dir, corpus, out, batch_size):
    # 16 blocks, global batch 4 with 2 micro-batches per step: 2 steps an epoch, 6 steps in all. --compile off:
    # auto decides after step 3 from what the machine's cache (~/.cache/lm/compile.json) holds for the run's
    # shapes, which any run on the machine may have written: where it says compiling pays, a run compiles there
    # and takes minutes longer on a busy machine.
    return [ROOT / f"train_{task}.py", "--model", model_dir, "--train-file", corpus, "--block-size", "16",
            "--max-train-samples", "16", "--batch-size", batch_size, "--grad-accum-steps", "2", "--epochs", "3",
            "--log-every", "1", "--precision", "fp32", "--lr", "1e-3", "--warmup-steps", "2", "--compile", "off",
            "--output-dir", out]


# Every run of a comparison, the reference on one process too, on one thread: a thread count of the environment's
# would give the reference other matmul kernels (other roundings) than the ranks'.
ONE_THREAD = {**ENV, "OMP_NUM_THREADS": "1"}


def torchrun(*extra, script_args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, *map(str, script_args)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ONE_THREAD, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600, returncode=0):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # A run past its time must not outlive its test, slowing (or waiting on) the next ones. Its workers run in
        # sessions of their own, which killing torchrun would leave behind: SIGTERM makes torchrun signal them and
        # kill them 30 s later.
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == returncode, err[-3000:]
    return out if returncode == 0 else err


def one_process(task, model_dir, corpus, out, *extra):
    run = subprocess.run([sys.executable, *map(str, args(task, model_dir, corpus, out, 4)), *map(str, extra)],
                         cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def single(no_dropout_models, corpus, tmp_path_factory):
    """The uninterrupted one-process run of a task (batch 4), made on first use; its checkpoint at step 3 too."""
    runs = {}

    def get(task):
        if task not in runs:
            runs[task] = tmp_path_factory.mktemp(f"single-{task}") / "run"
            one_process(task, no_dropout_models[task], corpus, runs[task], "--save-every", "3")
        return runs[task]

    return get


def assert_same_weights(single, multi, task):
    sa, sb = AUTO[task].from_pretrained(single).state_dict(), AUTO[task].from_pretrained(multi).state_dict()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-4, atol=1e-6, msg=name)


def assert_same_training(single, multi, task):
    a, b = scalars(single, "train/loss"), scalars(multi, "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5)
    assert metrics(multi)["eval_loss"] == pytest.approx(metrics(single)["eval_loss"], rel=1e-5)
    assert_same_weights(single, multi, task)


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_two_processes_equal_one_with_the_same_global_batch(task, no_dropout_models, corpus, single, tmp_path):
    out = finish(torchrun("--standalone", "--nproc_per_node", "2",
                          script_args=args(task, no_dropout_models[task], corpus, tmp_path / "two", 2)))
    assert "x 2 processes" in out
    assert_same_training(single(task), tmp_path / "two", task)
    assert metrics(tmp_path / "two")["world_size"] == 2


@pytest.mark.parametrize("task, options", [("clm", ["--document-boundaries", "--eval-stride", "6"]),
                                           ("mlm", ["--document-boundaries", "--fsdp"])])
def test_document_boundaries_and_strided_evaluation_on_two_processes_equal_one(task, options, no_dropout_models,
                                                                              corpus, tmp_path):
    model, one, two = no_dropout_models[task], tmp_path / "one", tmp_path / "two"
    one_process(task, model, corpus, one, *[o for o in options if o != "--fsdp"])
    finish(torchrun("--standalone", "--nproc_per_node", "2", script_args=[*args(task, model, corpus, two, 2), *options]))
    assert_same_training(one, two, task)  # eval_loss too: the strided windows shared out, their sums all-reduced
    assert metrics(two)["perplexity_before"] == pytest.approx(metrics(one)["perplexity_before"], rel=1e-5)
    assert metrics(two)["eval_stride"] == metrics(one)["eval_stride"] == (6 if task == "clm" else None)


def test_a_validation_split_that_does_not_share_out_evenly_is_evaluated_whole_without_a_hang(no_dropout_models, corpus,
                                                                                           tmp_path):
    # 9 validation blocks in batches of 4 on 2 processes: rank 0 evaluates [0 2 4 6] and [8], rank 1 [1 3 5 7]
    # alone. Both must still ask the stop check, a collective, as often: it used to hang in the evaluation
    # before training until --ddp-timeout.
    model = no_dropout_models["clm"]
    # A hang outlasts finish's timeout (the run takes ~25 s alone); a --ddp-timeout as short would also stop a slow
    # rank of a loaded machine.
    extra = ["--validation-file", corpus, "--max-eval-samples", "9", "--max-train-steps", "1", "--peak-flops", "1e12"]
    one_process("clm", model, corpus, tmp_path / "one", *extra, "--batch-size", "8")
    finish(torchrun("--standalone", "--nproc_per_node", "2",
                    script_args=[*args("clm", model, corpus, tmp_path / "two", 4), *extra, "--ddp-timeout", "600"]),
           timeout=400)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert two["perplexity_before"] == pytest.approx(one["perplexity_before"], rel=1e-5)  # each block counted once
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


def test_two_nodes_by_rendezvous_equal_one_process(no_dropout_models, corpus, single, tmp_path):
    # The rendezvous store is hosted here, on a port the system picks and that stays taken while the nodes run: a
    # port found free by binding and closing a socket can be taken by any process before node 0 listens on it.
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    nodes = [torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-conf", "is_host=false",
                      "--rdzv-id", "lm-test", script_args=args("clm", no_dropout_models["clm"], corpus,
                                                               tmp_path / "nodes", 2))
             for rank in (0, 1)]
    for node in nodes:
        finish(node)
    assert_same_training(single("clm"), tmp_path / "nodes", "clm")


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_fsdp_trains_like_one_process_and_saves_a_whole_model(task, no_dropout_models, corpus, single, tmp_path):
    finish(torchrun("--standalone", "--nproc_per_node", "2",
                    script_args=[*args(task, no_dropout_models[task], corpus, tmp_path / "fsdp", 2), "--fsdp"]))
    assert_same_training(single(task), tmp_path / "fsdp", task)  # from_pretrained loads the gathered model


def assert_resumes_from_step_3(run: list, out):
    """Throw away the model a finished torchrun `run` saved in `out` and resume from its step 3: the last 3 steps
    again, the same weights."""
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    finish(torchrun("--standalone", "--nproc_per_node", "2",
                    script_args=[*run, "--resume-from", out / "checkpoints" / "step-3"]))
    again = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name in final:
        torch.testing.assert_close(again[name], final[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fsdp_checkpoint_resumes(no_dropout_models, corpus, tmp_path):
    run = [*args("clm", no_dropout_models["clm"], corpus, tmp_path / "fsdp", 2), "--fsdp", "--save-every", "3"]
    finish(torchrun("--standalone", "--nproc_per_node", "2", script_args=run))
    assert_resumes_from_step_3(run, tmp_path / "fsdp")


@NEEDS_MUON
def test_muon_on_two_processes_and_under_fsdp_trains_like_one_process_and_resumes(no_dropout_models, corpus,
                                                                                  tmp_path):
    # torch's Muon orthogonalises in bf16: fp32 sums added up in another order on 2 processes (DDP's all-reduce,
    # FSDP's sharded matmuls on DTensors) move its updates by a fraction of one step, so weights agree to 5e-4.
    # Each run is bitwise repeatable; the weights differed by at most 2.4e-4 (losses 1.4e-6) over 7 seeds of the
    # model and data, and by 1.3e-4 with oneDNN held to AVX2 (another CPU's bf16 kernels).
    model, muon = no_dropout_models["clm"], ["--optimizer", "muon"]
    one_process("clm", model, corpus, tmp_path / "one", *muon)
    finish(torchrun("--standalone", "--nproc_per_node", "2",
                    script_args=[*args("clm", model, corpus, tmp_path / "ddp", 2), *muon]))
    fsdp = [*args("clm", model, corpus, tmp_path / "fsdp", 2), *muon, "--fsdp", "--save-every", "3"]
    finish(torchrun("--standalone", "--nproc_per_node", "2", script_args=fsdp))
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    for run in ("ddp", "fsdp"):
        for (_, x), (_, y) in zip(scalars(tmp_path / "one", "train/loss"), scalars(tmp_path / run, "train/loss"),
                                  strict=True):
            assert y == pytest.approx(x, rel=1e-5)
        two = AutoModelForCausalLM.from_pretrained(tmp_path / run).state_dict()
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=0, atol=5e-4, msg=name)
    assert_resumes_from_step_3(fsdp, tmp_path / "fsdp")  # Muon's and AdamW's state gathered and scattered back


def test_fsdp_needs_torchrun(no_dropout_models, corpus, tmp_path):
    r = subprocess.run([sys.executable, *map(str, args("clm", no_dropout_models["clm"], corpus, tmp_path / "x", 4)),
                        "--fsdp"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr


def test_signalled_torchrun_run_prints_a_torchrun_command_and_resumes_on_one_process(no_dropout_models, corpus, single,
                                                                                    tmp_path):
    """2 processes x batch 2, stopped by SIGTERM after step 3 (mid-epoch), resumed by 1 process x batch 4."""
    model, two = no_dropout_models["mlm"], tmp_path / "two"
    err = finish(torchrun("--standalone", "--nproc_per_node", "2", script_args=args("mlm", model, corpus, two, 2),
                          env=signalled_at(3, "SIGTERM")), returncode=1)  # torchrun's code when a worker fails
    command = err.split("resume with: ")[1].splitlines()[0]
    checkpoint = two / "checkpoints" / "step-3"
    assert command.startswith("torchrun --standalone --nproc_per_node 2 ") and command.endswith(f"--resume-from {checkpoint}")
    resumed = one_process("mlm", model, corpus, two, "--resume-from", checkpoint)
    assert "resume: --batch-size 2 -> 4 from step 3" in resumed.stdout
    assert "resume: processes 2 -> 1 from step 3" in resumed.stdout
    assert "dropout draws differ" in resumed.stderr
    assert_same_training(single("mlm"), two, "mlm")


def test_one_process_checkpoint_resumes_on_two(no_dropout_models, corpus, single, tmp_path):
    """The reference's step-3 checkpoint (1 process x batch 4) continued by 2 processes x batch 2."""
    out = tmp_path / "two"
    finish(torchrun("--standalone", "--nproc_per_node", "2",
                    script_args=[*args("clm", no_dropout_models["clm"], corpus, out, 2),
                                 "--resume-from", single("clm") / "checkpoints" / "step-3"]))
    reference = scalars(single("clm"), "train/loss")
    resumed = scalars(out, "train/loss")
    assert [s for s, _ in resumed] == [4, 5, 6]
    for (_, x), (_, y) in zip(reference[3:], resumed):
        assert y == pytest.approx(x, rel=1e-5)
    assert_same_weights(single("clm"), out, "clm")


def test_resume_refuses_another_global_batch(no_dropout_models, corpus, single, tmp_path):
    r = subprocess.run([sys.executable, *map(str, args("clm", no_dropout_models["clm"], corpus, tmp_path / "x", 2)),
                        "--resume-from", single("clm") / "checkpoints" / "step-3"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert ("global batch is 8 examples (--batch-size 4 x 1 process x --grad-accum-steps 2), this run's 4 examples "
            "(--batch-size 2 x 1 process x --grad-accum-steps 2)") in r.stderr


@pytest.mark.parametrize("case", ["not-utf8-found-while-tokenizing", "fewer-blocks-than-processes"])
def test_a_preparation_error_stops_every_rank_at_once(case, no_dropout_models, corpus, tmp_path):
    extra, message = [], "2 processes: each process needs at least one"
    train_file = corpus
    if case == "not-utf8-found-while-tokenizing":  # found only while rank 0 tokenizes
        train_file = tmp_path / "bad.txt"
        train_file.write_bytes(corpus.read_bytes() * 3 + b"caf\xe9\n")
        extra, message = ["--validation-file", corpus], "not UTF-8 text"
    else:
        extra = ["--max-train-samples", "1"]
    script = [*args("clm", no_dropout_models["clm"], train_file, tmp_path / "out", 2), *extra, "--ddp-timeout", "600"]
    # not the 600 s timeout: finish fails the test at 400 s, where the run takes ~15 s alone and several times that
    # on a loaded machine
    err = finish(torchrun("--standalone", "--nproc_per_node", "2", script_args=script), timeout=400, returncode=1)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1] and message in errors[0], err[-3000:]
    assert err.count("exitcode  : 2") == 2, err[-3000:]  # torchrun's summary: both ranks exited with 2


def test_a_block_count_that_does_not_divide_resumes_exactly_on_another_number_of_processes(no_dropout_models, corpus,
                                                                                          tmp_path):
    """17 blocks, global batch 8: each epoch is steps of 8, 8 and 1 examples, on any number of processes.

    One process (batch 4 x 2 micro-batches) checkpoints at step 2; two (batch 2 x 2) resume there and
    run the short step, where the second process has no example and runs an idle micro-batch.
    """
    model, one, two = no_dropout_models["mlm"], tmp_path / "one", tmp_path / "two"
    extra = ["--max-train-samples", "17", "--save-every", "2"]
    one_process("mlm", model, corpus, one, *extra)
    finish(torchrun("--standalone", "--nproc_per_node", "2",
                    script_args=[*args("mlm", model, corpus, two, 2), *extra,
                                 "--resume-from", one / "checkpoints" / "step-2"]))
    reference, resumed = scalars(one, "train/loss"), scalars(two, "train/loss")
    assert [s for s, _ in reference] == list(range(1, 10))  # 3 epochs of 3 steps
    assert [s for s, _ in resumed] == list(range(3, 10))
    for (_, x), (_, y) in zip(reference[2:], resumed):
        assert y == pytest.approx(x, rel=1e-5)
    assert_same_weights(one, two, "mlm")
    assert metrics(two)["train_tokens"] == metrics(one)["train_tokens"] == 3 * 17 * 16


def test_line_by_line_token_counts_are_the_sum_over_processes(no_dropout_models, tmp_path):
    # lines of many lengths: what each process trains on differs, so rank 0's count x 2 would be wrong
    from transformers import AutoTokenizer

    from lm.data import tokenize_lines
    from lm.texts import hold_out

    model = no_dropout_models["mlm"]
    lines = [" ".join(["word"] * (1 + i % 9)) + "\n" for i in range(40)]
    corpus = tmp_path / "lines.txt"
    corpus.write_text("".join(lines))
    train_lines, _ = hold_out(lines, 5.0)  # no --validation-file: the first 5% are held out
    expected = sum(len(ids) for ids in tokenize_lines(train_lines, AutoTokenizer.from_pretrained(model), 16)[:16])
    common = ["--line-by-line", "--epochs", "1"]
    one_process("mlm", model, corpus, tmp_path / "one", *common)
    finish(torchrun("--standalone", "--nproc_per_node", "2",
                    script_args=[*args("mlm", model, corpus, tmp_path / "two", 2), *common]))
    assert metrics(tmp_path / "two")["train_tokens"] == metrics(tmp_path / "one")["train_tokens"] == expected


def test_a_failed_checkpoint_write_is_the_same_error_on_every_rank(no_dropout_models, corpus, tmp_path):
    # after step 3 no file may grow past 1 MB: rank 0's step-4 model.pt (4 MB) fails as on a full disk; the
    # other rank, waiting for it, must not go on into the next step's collectives (or hang there)
    script = [*args("clm", no_dropout_models["clm"], corpus, tmp_path / "out", 2), "--save-every", "2",
              "--ddp-timeout", "600"]
    err = finish(torchrun("--standalone", "--nproc_per_node", "2", script_args=script,  # not the 600 s timeout
                          env={**signalled_at(3), "LM_TEST_FILE_LIMIT": str(1 << 20)}), timeout=400, returncode=1)
    errors = re.findall(r"error: [^\r\n]*", err)  # rank 1's line may follow rank 0's progress bar on its line
    assert len(errors) == 2 and errors[0] == errors[1], err[-3000:]
    assert errors[0].startswith("error: writing checkpoint step-4 failed: File too large; the last complete ")
    assert errors[0].endswith("step-2 is intact") and err.count("Traceback") == 1  # torchrun's own, none of ours
    assert err.count("exitcode  : 2") == 2, err[-3000:]  # torchrun's summary: both ranks exited with 2

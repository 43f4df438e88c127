"""The per-machine cache (lm.cache) can only make a run faster: what it can't read is measured again, what
it can't write is a warning, it leaves no temporary file, others can read it, and concurrent writers
keep each other's entries."""

import json
import os
import stat
import subprocess
import sys


from conftest import ENV, ROOT
from lm.cache import measured, recalled, remember
from lm.compiling import COMPILE_CACHE, COMPILE_GAIN, COMPILE_SECONDS, compile_estimate, record_compile


def test_an_entry_that_cannot_be_read_is_measured_again(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return {"flops": 1e12}

    for damaged in ('{"key": {"flops": "fast"}}', '{"key": [1, 2]}', '["not", "entries"]', "{not json",
                    '{"key": {"flops": NaN}}', '{"key": {"flops": true}}'):
        (tmp_path / "peak.json").write_text(damaged)
        assert measured(tmp_path, "peak.json", "key", measure, needs=("flops",)) == {"flops": 1e12}
    assert len(calls) == 6
    assert measured(tmp_path, "peak.json", "key", measure, needs=("flops",))["flops"] == 1e12 and len(calls) == 6
    # compile.json with a value of the wrong kind: estimated as if never measured, no TypeError mid-run
    (tmp_path / COMPILE_CACHE).write_text(json.dumps({"k": {"seconds": "slow", "gain": None, "compiles": "1"}}))
    assert compile_estimate(tmp_path, "k", "cpu-avx512_bf16", "bf16")[:2] == (COMPILE_SECONDS["cpu"],
                                                                             COMPILE_GAIN["cpu-avx512_bf16", "bf16"])


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a file where the cache directory should be\n")
    record_compile(not_a_dir, "key", 12.0, 0.2)  # as a run does mid-training
    remember(not_a_dir / "sub", "peak.json", "key", {"flops": 1.0})
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: could not keep a measurement in ") for line in err)
    assert err[0].endswith("the next run measures again")


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path):
    # a real file-size limit (as a quota or a full disk): the write fails, the old file stays whole
    (tmp_path / "peak.json").write_text(json.dumps({"old": {"flops": 1.0}}))
    code = f"""
import resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from lm.cache import remember
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
remember({str(tmp_path)!r}, "peak.json", "new", {{"flops": 2.0, "note": "x" * 200}})
"""
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.startswith("warning: could not keep a measurement in "), r.stderr
    assert "File too large" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["peak.json"]
    assert recalled(tmp_path, "peak.json", "old") == {"flops": 1.0}


def test_cache_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        remember(tmp_path, "peak.json", "key", {"flops": 1.0})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "peak.json").stat().st_mode) == 0o644


WRITER = """
import sys
sys.path.insert(0, {root!r})
from lm.cache import remember
for i in range(60):
    remember({cache!r}, "attention.json", f"{name} {{i}}", {{"sdpa": i, "eager": i}})
"""


def test_concurrent_writers_lose_no_entry(tmp_path):
    writers = [subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), cache=str(tmp_path), name=name)],
                                env=ENV) for name in ("a", "b", "c")]
    assert [w.wait(timeout=300) for w in writers] == [0, 0, 0]
    kept = json.loads((tmp_path / "attention.json").read_text())
    assert sorted(kept) == sorted(f"{name} {i}" for name in "abc" for i in range(60))

"""Tokenize once, in parallel, into a flat token file; train from a memory map of it; reuse it next time.

A prepared text is a directory <cache>/tokens/<key>/ holding tokens.bin (every text's ids, special
tokens included, concatenated in order, stored as uint16 when the vocabulary fits, else uint32) and
meta.json, written last. The key hashes all the ids depend on: the tokenizer, the data and the
options that pick the texts. The block size is not part of it, since blocks are a reshaped view of
the same file. A preparation is written into a temporary sibling directory and renamed into place,
so a run that dies halfway leaves nothing that looks finished.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.errors import UsageError
from lm.texts import TextFile, not_utf8, split_lines

# No torch here, nor in lm.texts: it would add seconds to every worker's start.

FORMAT = 1
CHUNK_BYTES = 1 << 20  # a worker's share of a .txt file: big enough to hide the hand-off, small in memory
CHUNK_TEXTS = 2000  # the same for texts already in memory
ENCODE_BATCH = 1000


# ---------------------------------------------------------------- the cache

@dataclass
class Prepared:
    """A finished token file: where, how many ids, their dtype, and whether this run reused it."""

    path: Path
    num_tokens: int
    dtype: str
    reused: bool

    def tokens(self) -> np.ndarray:
        """The flat ids, memory-mapped: (num_tokens,) uint16 or uint32."""
        if self.num_tokens == 0:  # np.memmap refuses an empty file
            return np.empty(0, self.dtype)
        return np.memmap(self.path / "tokens.bin", dtype=self.dtype, mode="r", shape=(self.num_tokens,))


def tokenizer_identity(tokenizer) -> str:
    """A hash of everything that decides the tokenizer's ids: its full serialization, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without truncation and padding: transformers sets them on the backend per call, and they
        # don't apply to our untruncated, unpadded encoding anyway.
        spec = json.loads(backend.to_str())
        spec = json.dumps({k: v for k, v in spec.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, str(tokenizer.special_tokens_map), len(tokenizer)]
    return hashlib.sha256((spec + json.dumps(extra)).encode()).hexdigest()


def cache_key(source, tokenizer) -> str:
    what = {"format": FORMAT, "tokenizer": tokenizer_identity(tokenizer), "data": source.identity(),
            "special_tokens": True}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def _finished(path: Path) -> Prepared | None:
    """The preparation at `path` if it is complete and consistent, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        size = (path / "tokens.bin").stat().st_size
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or size != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    return Prepared(path, meta["num_tokens"], meta["dtype"], reused=True)


def prepare(source, tokenizer, root: Path, workers: int, split: str = "train", say=print) -> Prepared:
    """The token file of `source` under root/tokens: reused when it exists, else written now; `say` reports it."""
    key = cache_key(source, tokenizer)
    target = Path(root) / "tokens" / key
    found = _finished(target)
    if found is not None:
        say(f"{split}: reusing tokenized data {target} ({found.num_tokens:,} tokens)", flush=True)
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))  # hidden and never a key: never read
    try:
        started = time.perf_counter()
        dtype = token_dtype(tokenizer)
        tasks = _tasks(source)
        workers = max(1, min(workers, len(tasks)))
        n, bare = _write_tokens(source, tasks, tokenizer, dtype, tmp / "tokens.bin", workers)
        meta = {"format": FORMAT, "num_tokens": n, "dtype": dtype.name, "source": source.identity()
                if isinstance(source, TextFile) else {"texts": len(source.texts)}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if target.exists() and _finished(target) is None:
            shutil.rmtree(target)  # a damaged copy, e.g. edited by hand
        try:
            os.replace(tmp, target)
        except OSError:  # another run finished the same preparation first; theirs is as good as ours
            if _finished(target) is None:
                raise
        seconds = time.perf_counter() - started
        say(f"{split}: tokenized into {target} ({n:,} tokens, {seconds:.1f} s, "
              f"{n / max(seconds, 1e-9):,.0f} tokens/s, {workers} process{'es' * (workers > 1)}"
              f"{'' if bare else ', slow tokenizer'})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(target, n, dtype.name, reused=False)


# ---------------------------------------------------------------- tokenizing in parallel

def default_workers() -> int:
    """The tokenizing processes when --preprocessing-workers is not given: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tasks(source) -> list:
    """A worker's units of work, in order: (path, start, end) byte ranges of a file, or lists of texts."""
    if isinstance(source, TextFile):
        tasks = [(source.path, lo, hi) for lo, hi in _chunks(source)]
        if not tasks:
            raise UsageError(f"{source.path}: the file is empty")
        return tasks
    texts = source.texts
    return [texts[i:i + CHUNK_TEXTS] for i in range(0, len(texts), CHUNK_TEXTS)]


def _write_tokens(source, tasks, tokenizer, dtype: np.dtype, out: Path, workers: int) -> tuple[int, bool]:
    """Append the ids of every task, in order, to `out`: (how many, whether the bare backend made them)."""
    encoder = _worker_encoder(tokenizer, tasks)
    n, any_text = 0, False
    with open(out, "wb") as f:
        for ids, has_text in _in_order(tasks, encoder, dtype, workers):
            ids.tofile(f)
            n += len(ids)
            any_text |= has_text
    if isinstance(source, TextFile) and not any_text:
        raise UsageError(f"{source.path}: the file is empty")
    return n, encoder is not tokenizer


def _worker_encoder(tokenizer, tasks):
    """What workers tokenize with: the bare `tokenizers` object when it gives the same ids (it loads in
    a fraction of a second in a fresh process, transformers takes seconds), else the tokenizer itself."""
    if getattr(tokenizer, "backend_tokenizer", None) is None or not tasks:
        return tokenizer
    from tokenizers import Tokenizer

    # A copy without the padding and truncation a tokenizer.json may carry (MiniLM's pads to 128):
    # transformers switches them per call, a bare backend would apply them.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    sample = split_lines(_read_range(*tasks[0])[:100_000]) if isinstance(tasks[0], tuple) else tasks[0]
    sample = sample[:ENCODE_BATCH]
    same = _encode_ids(backend, sample) == _encode_ids(tokenizer, sample)
    return backend if same else tokenizer


def _encode_ids(encoder, texts: list[str]) -> list[list[int]]:
    if hasattr(encoder, "encode_batch_fast"):  # tokenizers.Tokenizer: skips offsets we don't need
        return [e.ids for e in encoder.encode_batch_fast(texts, add_special_tokens=True)]
    return encoder(texts, add_special_tokens=True, return_attention_mask=False, verbose=False)["input_ids"]


def _in_order(tasks, encoder, dtype, workers: int):
    """Results of _tokenize_task in task order, with at most 2 per worker in flight (bounded memory)."""
    if workers <= 1:
        for task in tasks:
            yield _tokenize_task(task, encoder, dtype)
        return
    # spawn: forking a process that holds torch and tokenizers threads can deadlock
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(encoder, dtype)) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_tokenize_in_worker, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_worker = {}


def _init_worker(encoder, dtype):
    # The processes are the parallelism; a thread pool in each would only fight over the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(encoder=encoder, dtype=dtype)


def _tokenize_in_worker(task):
    return _tokenize_task(task, _worker["encoder"], _worker["dtype"])


def _tokenize_task(task, encoder, dtype) -> tuple[np.ndarray, bool]:
    """(ids of the task's texts, whether any text is more than white space)."""
    if isinstance(task, tuple):
        raw = _read_range(*task)
        texts, has_text = split_lines(raw), not raw.isspace()
    else:
        texts, has_text = task, True
    pieces = []
    for start in range(0, len(texts), ENCODE_BATCH):
        ids = _encode_ids(encoder, texts[start:start + ENCODE_BATCH])
        # fromiter into the file's dtype: raises instead of wrapping if an id does not fit
        pieces.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=sum(map(len, ids))))
    return (np.concatenate(pieces) if pieces else np.empty(0, dtype)), has_text


def _read_range(path: str, lo: int, hi: int) -> str:
    with open(path, "rb") as f:
        f.seek(lo)
        data = f.read(hi - lo)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, lo + e.start) from None


# ---------------------------------------------------------------- streaming a .txt file

def _chunks(source: TextFile):
    """Byte ranges of about CHUNK_BYTES covering the source's lines, each ending just after a '\\n'.

    Cutting only after '\\n' keeps split_lines exact per chunk: '\\r\\n' is never split, and
    only the file's last chunk can end in a line without a line break.
    """
    lo, hi = source.byte_range()
    with open(source.path, "rb") as f:
        pos = lo
        while pos < hi:
            end = min(pos + CHUNK_BYTES, hi)
            if end < hi:
                f.seek(end)
                while True:
                    block = f.read(1 << 16)
                    cut = block.find(b"\n")
                    if cut >= 0 or not block:
                        end = min(end + (cut + 1 if cut >= 0 else len(block)), hi)
                        break
                    end += len(block)
            yield pos, end
            pos = end


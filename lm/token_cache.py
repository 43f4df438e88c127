"""Tokenize once, in parallel, into a flat token file; train from a memory map of it; reuse it next time.

A prepared text is a directory <cache>/tokens/<key>/ holding tokens.bin (every text's ids, special
tokens included, concatenated in order, stored as uint16 when the vocabulary fits, else uint32) and
meta.json, written last. With `documents` (--document-boundaries) each text also ends with the
tokenizer's end-of-text token where the tokenizer adds none itself, and starts.bin holds where each
text starts in tokens.bin (int64 offsets), so that blocks can keep their texts apart. Conversations
(prepare_conversations) keep starts.bin too, and mask.bin: one byte per token, 1 where it carries loss.
The key hashes all the ids depend on: the tokenizer, the data, the options that pick the texts and
`documents` (for conversations: the chat template and the loss rule).
The block size is not part of it, since blocks are a reshaped view of the same file. A preparation
is written into a temporary sibling directory and renamed into place, so a run that dies halfway
leaves nothing that looks finished.
"""

from __future__ import annotations

import collections
import contextlib
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
from lm.texts import TextFile, bom_length, not_utf8, split_lines

# No torch here, nor in lm.texts: it would add seconds to every worker's start.

FORMAT = 1
CHUNK_BYTES = 1 << 20  # a worker's share of a .txt file: big enough to hide the hand-off, small in memory
CHUNK_TEXTS = 2000  # the same for texts already in memory
ENCODE_BATCH = 1000


# ---------------------------------------------------------------- the cache

@dataclass
class Prepared:
    """A finished token file: where, how many ids, their dtype, whether this run reused it, and how many
    texts starts.bin locates (None: not kept)."""

    path: Path
    num_tokens: int
    dtype: str
    reused: bool
    num_texts: int | None = None
    masked: bool = False  # conversations: mask.bin holds each token's loss mask

    def loss_mask(self) -> np.ndarray:
        """1 where a token carries the loss, memory-mapped: (num_tokens,) uint8 (conversations only)."""
        return _memmap(self.path / "mask.bin", np.uint8, self.num_tokens)

    def tokens(self) -> np.ndarray:
        """The flat ids, memory-mapped: (num_tokens,) uint16 or uint32."""
        return _memmap(self.path / "tokens.bin", self.dtype, self.num_tokens)

    def starts(self) -> np.ndarray | None:
        """Where each text starts in tokens(), memory-mapped: (num_texts,) int64, increasing; None if not kept."""
        return None if self.num_texts is None else _memmap(self.path / "starts.bin", np.int64, self.num_texts)


def _memmap(path: Path, dtype, n: int) -> np.ndarray:
    if n == 0:  # np.memmap refuses an empty file
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


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
    if getattr(tokenizer, "split_special_tokens", False):  # a setting of transformers', not in the serialization;
        extra.append("split_special_tokens")  # only when on: the keys of other tokenizers stay what they were
    return hashlib.sha256((spec + json.dumps(extra)).encode()).hexdigest()


def cache_key(source, tokenizer, documents: bool = False) -> str:
    what = {"format": FORMAT, "tokenizer": tokenizer_identity(tokenizer), "data": source.identity(),
            "special_tokens": True}
    if documents:  # only then: the keys of caches written without it stay what they were
        what["documents"] = True
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def text_separator(tokenizer) -> int | None:
    """The id that ends each text under --document-boundaries: None where the tokenizer ends a text with a
    special token itself (BERT's [SEP], RoBERTa's </s>), else its end-of-text token (GPT-2, SmolLM2)."""
    ends = tokenizer("a", add_special_tokens=True)["input_ids"]
    if ends and ends[-1] in set(tokenizer.all_special_ids):
        return None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"--document-boundaries ends each text with the tokenizer's end-of-text token, and the "
                         f"tokenizer {tokenizer.name_or_path} has none; drop --document-boundaries or use a "
                         "tokenizer with an eos token")
    return tokenizer.eos_token_id


def _finished(path: Path) -> Prepared | None:
    """The preparation at `path` if it is complete and consistent, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        size = (path / "tokens.bin").stat().st_size
        starts = (path / "starts.bin").stat().st_size if meta.get("num_texts") else 0
        mask = (path / "mask.bin").stat().st_size if meta.get("masked") else meta["num_tokens"]
    except (OSError, ValueError):
        return None
    if (meta.get("format") != FORMAT or size != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
            or starts != (meta.get("num_texts") or 0) * 8 or mask != meta["num_tokens"]):
        return None
    return Prepared(path, meta["num_tokens"], meta["dtype"], reused=True, num_texts=meta.get("num_texts"),
                    masked=bool(meta.get("masked")))


def prepare(source, tokenizer, root: Path, workers: int, split: str = "train", say=print,
            documents: bool = False) -> Prepared:
    """The token file of `source` under root/tokens: reused when it exists, else written now; `say` reports it.

    `documents` (--document-boundaries): end every text with an end-of-text token (text_separator) and keep
    where each text starts (Prepared.starts).
    """
    key = cache_key(source, tokenizer, documents)
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
        separator = text_separator(tokenizer) if documents else None
        n, texts, bare = _write_tokens(source, tasks, tokenizer, dtype, tmp, workers, separator, documents)
        meta = {"format": FORMAT, "num_tokens": n, "dtype": dtype.name, "source": source.identity()
                if isinstance(source, TextFile) else {"texts": len(source.texts)}}
        if documents:
            meta.update(num_texts=texts, separator=separator)
        publish(tmp, target, meta)
        seconds = time.perf_counter() - started
        say(f"{split}: tokenized into {target} ({n:,} tokens, {seconds:.1f} s, "
              f"{n / max(seconds, 1e-9):,.0f} tokens/s, {workers} process{'es' * (workers > 1)}"
              f"{'' if bare else ', slow tokenizer'})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(target, n, dtype.name, reused=False, num_texts=texts if documents else None)


def publish(tmp: Path, target: Path, meta: dict) -> None:
    """Write meta.json last into the finished `tmp` and rename it into place as `target`."""
    from lm.output import umask  # here, not at the top: it brings torch, which workers never need

    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    # mkdtemp makes it 0700: the umask's permissions instead, so that others sharing the cache can read it
    os.chmod(tmp, 0o777 & ~umask())
    if target.exists() and _finished(target) is None:
        shutil.rmtree(target)  # a damaged copy, e.g. edited by hand
    try:
        os.replace(tmp, target)
    except OSError:  # another run finished the same preparation first; theirs is as good as ours
        if _finished(target) is None:
            raise


# ---------------------------------------------------------------- conversations

def prepare_conversations(source, tokenizer, template: str, root: Path, split: str = "train",
                          say=print) -> Prepared:
    """The token file of conversations (lm.texts.Conversations), each rendered by `template`, beside mask.bin
    (1 where a token carries the loss, by the source's loss rule) and starts.bin (where each one starts).
    The key adds the template and the loss rule to what prepare's holds."""
    from lm import chats

    what = {"format": FORMAT, "tokenizer": tokenizer_identity(tokenizer), "data": source.identity(),
            "template": chats.template_identity(template, source.loss_on)}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    target = Path(root) / "tokens" / key
    found = _finished(target)
    if found is not None and found.masked:
        say(f"{split}: reusing tokenized conversations {target} ({found.num_tokens:,} tokens)", flush=True)
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        started, dtype = time.perf_counter(), token_dtype(tokenizer)
        ids, masks = [], []
        for messages in source.conversations:
            tokens, mask = chats.encode_conversation(messages, tokenizer, template, source.loss_on)
            ids.append(tokens)
            masks.append(mask)
        lengths = np.array([len(t) for t in ids], dtype=np.int64)
        n = int(lengths.sum())
        np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=n).tofile(tmp / "tokens.bin")
        np.fromiter(itertools.chain.from_iterable(masks), dtype=np.uint8, count=n).tofile(tmp / "mask.bin")
        (np.cumsum(lengths) - lengths).tofile(tmp / "starts.bin")
        publish(tmp, target, {"format": FORMAT, "num_tokens": n, "dtype": dtype.name, "num_texts": len(ids),
                              "masked": True, "source": {"conversations": len(ids)}})
        say(f"{split}: tokenized {len(ids):,} conversations into {target} ({n:,} tokens, "
            f"{time.perf_counter() - started:.1f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(target, n, dtype.name, reused=False, num_texts=len(ids), masked=True)


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


def _write_tokens(source, tasks, tokenizer, dtype: np.dtype, out: Path, workers: int, separator: int | None,
                  documents: bool) -> tuple[int, int, bool]:
    """Write the ids of every task, in order, to out/tokens.bin, and with `documents` where each text starts
    to out/starts.bin: (ids, texts, whether the bare backend made them)."""
    encoder = _worker_encoder(tokenizer, tasks)
    n, texts, any_text = 0, 0, False
    with open(out / "tokens.bin", "wb") as f, (open(out / "starts.bin", "wb") if documents
                                                else contextlib.nullcontext()) as starts:
        for ids, lengths, has_text in _in_order(tasks, encoder, dtype, workers, separator, documents):
            ids.tofile(f)
            if documents:
                (n + np.cumsum(lengths) - lengths).astype(np.int64).tofile(starts)
                texts += len(lengths)
            n += len(ids)
            any_text |= has_text
    if isinstance(source, TextFile) and not any_text:
        raise UsageError(f"{source.path}: the file is empty")
    return n, texts, encoder is not tokenizer


def _worker_encoder(tokenizer, tasks):
    """What workers tokenize with: the bare `tokenizers` object when it gives the same ids (it loads in
    a fraction of a second in a fresh process, transformers takes seconds), else the tokenizer itself."""
    if getattr(tokenizer, "backend_tokenizer", None) is None or not tasks:
        return tokenizer
    if getattr(tokenizer, "split_special_tokens", False):  # a copy would lose it: special tokens' text is text
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


def _in_order(tasks, encoder, dtype, workers: int, separator: int | None, documents: bool):
    """Results of _tokenize_task in task order, with at most 2 per worker in flight (bounded memory)."""
    if workers <= 1:
        for task in tasks:
            yield _tokenize_task(task, encoder, dtype, separator, documents)
        return
    # spawn: forking a process that holds torch and tokenizers threads can deadlock
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(encoder, dtype, separator, documents)) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_tokenize_in_worker, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_worker = {}


def _init_worker(encoder, dtype, separator, documents):
    # The processes are the parallelism; a thread pool in each would only fight over the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(encoder=encoder, dtype=dtype, separator=separator, documents=documents)


def _tokenize_in_worker(task):
    return _tokenize_task(task, _worker["encoder"], _worker["dtype"], _worker["separator"], _worker["documents"])


def _tokenize_task(task, encoder, dtype, separator: int | None,
                   documents: bool) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(ids of the task's texts, each text's length with `documents` else None, whether any text is more than
    white space). `separator` ends every text."""
    if isinstance(task, tuple):
        raw = _read_range(*task)
        texts, has_text = split_lines(raw), bool(raw.strip())
    else:
        texts, has_text = task, True
    pieces, lengths = [], []
    for start in range(0, len(texts), ENCODE_BATCH):
        ids = _encode_ids(encoder, texts[start:start + ENCODE_BATCH])
        if separator is not None:
            ids = [text + [separator] for text in ids]
        lengths.extend(map(len, ids))
        # fromiter into the file's dtype: raises instead of wrapping if an id does not fit
        pieces.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=sum(map(len, ids))))
    ids = np.concatenate(pieces) if pieces else np.empty(0, dtype)
    return ids, (np.array(lengths, dtype=np.int64) if documents else None), has_text


def _read_range(path: str, lo: int, hi: int) -> str:
    with open(path, "rb") as f:
        f.seek(lo)
        data = f.read(hi - lo)
    skip = bom_length(data) if lo == 0 else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, lo + skip + e.start) from None


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


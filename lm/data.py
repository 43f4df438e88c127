"""Texts -> token ids -> blocks, and the batches drawn from them. No model in here."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from lm.errors import UsageError
from lm.lines import not_utf8, split_lines

TEXT_SUFFIXES = (".txt", ".csv", ".json", ".jsonl")


# ---------------------------------------------------------------- reading texts

def read_texts(path: str, text_column: str = "text") -> list[str]:
    """The texts of one file. A .txt gives one text per line, its newline kept, empty lines too."""
    p = check_text_file(path)
    try:
        with open(p, encoding="utf-8", newline="") as f:
            raw = f.read()
    except UnicodeDecodeError as e:
        raise not_utf8(path, e.start) from None
    except OSError as e:  # os.access says yes to root, and some filesystems refuse reads it can't foresee
        raise UsageError(f"{path}: cannot be read ({e.strerror}); check the file and its permissions") from None
    if not raw.strip():
        raise UsageError(f"{path}: the file is empty")
    if p.suffix == ".txt":
        return split_lines(raw)
    # Records end at newlines only: str.splitlines would also break on \x0c, \x85, U+2028 and others
    if p.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(raw, newline="")))  # as csv wants a file opened with newline=""
    elif p.suffix == ".jsonl":
        rows = [_json(line.removesuffix("\r"), path) for line in raw.split("\n") if line.strip()]
    else:
        data = _json(raw, path)
        rows = data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else []
    if not rows or not all(isinstance(r, dict) and text_column in r for r in rows):
        columns = sorted(rows[0]) if rows and isinstance(rows[0], dict) else []
        raise UsageError(f"{path}: no column {text_column!r} in every record (columns: {', '.join(columns) or 'none'}); "
                         "choose one with --text-column")
    return [str(r[text_column]) for r in rows]


def check_text_file(path: str) -> Path:
    """The path of a readable file of a supported type, or a UsageError saying what is wrong."""
    p = Path(path)
    if p.suffix not in TEXT_SUFFIXES:
        raise UsageError(f"{path}: unsupported file type {p.suffix!r}; use one of {', '.join(TEXT_SUFFIXES)}")
    if p.is_dir():
        raise UsageError(f"{path}: is a directory; name a text file")
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{path}: not readable (check its permissions)")
    return p


def _json(text: str, path: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def hold_out(texts: list[str], percentage: float) -> tuple[list[str], list[str]]:
    """(train, validation): the first `percentage` percent of the texts become validation."""
    n = held_out_count(len(texts), percentage)
    return texts[n:], texts[:n]


def held_out_count(n_texts: int, percentage: float) -> int:
    """How many of the first texts `hold_out` makes validation."""
    n = max(1, int(n_texts * percentage / 100))
    if n >= n_texts:
        raise UsageError(f"too few texts ({n_texts}) to hold out {percentage}% for validation; "
                         "pass --validation-file")
    return n


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers; one socket, so offline machines learn it in milliseconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub_texts(name: str, config: str | None, text_column: str, pct: float) -> tuple[list[str], list[str]]:
    """(train, validation) texts of a Hub dataset, carving validation from train when it has none."""
    import datasets

    if not hub_reachable():
        try:  # a dataset cached by an earlier online run still works offline
            datasets.config.HF_HUB_OFFLINE = True
            ds = datasets.load_dataset(name, config)
        except Exception:
            raise UsageError(
                f"dataset {name!r} needs the Hugging Face Hub, which is unreachable; "
                "use the embedded corpus (drop --dataset) or --train-file FILE") from None
    else:
        ds = datasets.load_dataset(name, config)
    if "train" not in ds:
        raise UsageError(f"dataset {name!r} has no train split (splits: {', '.join(ds)})")
    if text_column not in ds["train"].column_names:
        raise UsageError(f"dataset {name!r} has no column {text_column!r} "
                         f"(columns: {', '.join(ds['train'].column_names)}); choose one with --text-column")
    train = list(ds["train"][text_column])
    if "validation" in ds:
        return train, list(ds["validation"][text_column])
    return hold_out(train, pct)


# ---------------------------------------------------------------- tokens and blocks

def tokenize(texts: list[str], tokenizer, desc: str = "tokenizing", batch_size: int = 1000) -> np.ndarray:
    """Tokenize each text with the tokenizer's special tokens and concatenate in order: (N,) int64."""
    pieces = []
    # delay: quick work draws no bar, so a fast failure leaves its one-line error alone on stderr
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False, delay=1):
        enc = tokenizer(texts[start:start + batch_size], add_special_tokens=True,
                        return_attention_mask=False, verbose=False)
        pieces.extend(enc["input_ids"])
    total = sum(map(len, pieces))  # np.fromiter over one chain: linear, unlike sum(lists, [])
    return np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=total)


def group_into_blocks(ids: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a flat id array into (n_blocks, block_size), dropping only the final remainder."""
    n = len(ids) // block_size
    return ids[: n * block_size].reshape(n, block_size)


def tokenize_lines(texts: list[str], tokenizer, max_length: int, desc: str = "tokenizing") -> list[np.ndarray]:
    """Line-by-line examples: every non-blank text on its own, truncated to max_length tokens."""
    lines = [t for t in texts if t.strip()]
    examples = []
    for start in tqdm(range(0, len(lines), 1000), desc=desc, unit="batch", leave=False, delay=1):
        enc = tokenizer(lines[start:start + 1000], add_special_tokens=True, truncation=True,
                        max_length=max_length, return_attention_mask=False)
        examples.extend(np.asarray(ids, dtype=np.int64) for ids in enc["input_ids"])
    return examples


class Examples(Dataset):
    """Token sequences (blocks of equal length, or lines of any length); an item is (index, ids)."""

    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        # int64 whatever the storage: blocks may be uint16 rows of a memory-mapped token file
        return i, torch.from_numpy(np.asarray(self.sequences[i], dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        if isinstance(self.sequences, np.ndarray):  # blocks: no walk over millions of memmap rows
            return int(self.sequences.size)
        return int(sum(len(s) for s in self.sequences))


def pad_batch(items, pad_id: int) -> dict:
    """Stack (index, ids) items, right-padding with pad_id: input_ids, attention_mask, index."""
    index = torch.tensor([i for i, _ in items])
    length = max(len(ids) for _, ids in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, (_, ids) in enumerate(items):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "index": index}


class EpochSampler(Sampler):
    """Indices in an order that depends only on (seed, epoch), resumable mid-epoch, sharded by rank.

    Because the order is a pure function of the epoch, no sampler RNG state needs saving: a resumed
    run rebuilds the permutation and starts at `start`. Rank r takes every world-th index, so the
    union of the ranks' batches i is the single-process batch i of size world * batch_size. For
    training, the last n % world examples are left out so that every rank runs as many batches.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                 drop_remainder: bool = True):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.used = n - n % world if drop_remainder else n
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; `start` (in global examples) skips what was already trained on."""
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        return iter(self.order()[: self.used][self.start + self.rank:: self.world].tolist())

    def __len__(self):
        return len(range(self.start + self.rank, self.used, self.world))


# ---------------------------------------------------------------- a run's data

def load_texts(cfg) -> tuple[list[str], list[str]]:
    """(train, validation) texts from --train-file/--validation-file, a Hub dataset, or the embedded corpus."""
    if cfg.data_source == "files":
        train = read_texts(cfg.train_file, cfg.text_column)
        if cfg.validation_file:
            return train, read_texts(cfg.validation_file, cfg.text_column)
        return hold_out(train, cfg.validation_split_percentage)
    if cfg.data_source == "hub":
        return load_hub_texts(cfg.dataset, cfg.dataset_config, cfg.text_column, cfg.validation_split_percentage)
    from lm.embedded import python_docs_texts

    return python_docs_texts()


def build_examples(texts: list[str], tokenizer, block_size: int, line_by_line: bool, limit: int | None,
                   split: str) -> Examples:
    """Blocks of block_size tokens (or padded lines), at most `limit` of them."""
    if line_by_line:
        sequences = tokenize_lines(texts, tokenizer, block_size, desc=f"tokenizing {split}")
        if not sequences:
            raise UsageError(f"the {split} text has no non-empty line")
    else:
        sequences = blocks_of(tokenize(texts, tokenizer, desc=f"tokenizing {split}"), block_size, split)
    return Examples(sequences[:limit] if limit else sequences)


def blocks_of(ids: np.ndarray, block_size: int, split: str) -> np.ndarray:
    """group_into_blocks, refusing a text too short for a single block."""
    sequences = group_into_blocks(ids, block_size)
    if len(sequences) == 0:
        raise UsageError(f"the {split} text has {len(ids)} tokens, fewer than one block of {block_size}; "
                         "add text or lower --block-size")
    return sequences

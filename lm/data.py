"""Token ids -> blocks -> batches, and the one entry point the loop calls: prepare_data. No model in here."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from lm import distributed, token_cache
from lm.embedded import cache_root
from lm.errors import UsageError
from lm.texts import load_sources

IGNORE = -100  # label of a position that is not predicted


# ---------------------------------------------------------------- tokens and blocks

def group_into_blocks(ids: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a flat id array into (n_blocks, block_size), dropping only the final remainder."""
    n = len(ids) // block_size
    return ids[: n * block_size].reshape(n, block_size)


def blocks_of(ids: np.ndarray, block_size: int, split: str) -> np.ndarray:
    """group_into_blocks, refusing a text too short for a single block."""
    sequences = group_into_blocks(ids, block_size)
    if len(sequences) == 0:
        raise UsageError(f"the {split} text has {len(ids)} tokens, fewer than one block of {block_size}; "
                         "add text or lower --block-size")
    return sequences


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

def prepare_data(cfg, tokenizer, block_size: int, world: distributed.World, say,
                 sources=None) -> tuple[Examples, Examples]:
    """(train, validation) examples of a run: rank 0 tokenizes, the other ranks then read its result.

    `say` reports progress and counts (the caller decides who prints); `sources` is what
    texts.load_sources(cfg) returned, for a caller that checked the files already.
    """
    sources = sources if sources is not None else load_sources(cfg)

    def examples(report):
        limits = (cfg.max_train_samples, cfg.max_eval_samples)
        return tuple(examples_of(cfg, source, split, limit, tokenizer, block_size, report)
                     for source, limit, split in zip(sources, limits, ("train", "validation")))

    # line by line: lists in memory, sent to the others; blocks: rank 0 fills the token cache, the
    # others then memory-map the same files. A user error on rank 0 stops every rank.
    sets = distributed.run_on_main(world, lambda: examples(say), send_result=cfg.line_by_line)
    train_set, eval_set = sets if sets is not None else examples(lambda *a, **k: None)
    if len(train_set) < world.size:
        raise UsageError(f"{len(train_set)} training blocks for {world.size} processes: each process needs at "
                         "least one; add text, lower --block-size or use fewer processes")
    say(f"data: {len(train_set)} train / {len(eval_set)} validation examples of <= {block_size} tokens")
    return train_set, eval_set


def examples_of(cfg, source, split: str, limit: int | None, tokenizer, block_size: int, say) -> Examples:
    """One split's examples, at most `limit`: blocks memory-mapped from the token cache, or line-by-line lists."""
    if cfg.line_by_line:
        sequences = tokenize_lines(source.texts, tokenizer, block_size, desc=f"tokenizing {split}")
        if not sequences:
            raise UsageError(f"the {split} text has no non-empty line")
    else:
        workers = cfg.preprocessing_workers or token_cache.default_workers()
        prepared = token_cache.prepare(source, tokenizer, cache_root(cfg.cache_dir), workers, split, say)
        sequences = blocks_of(prepared.tokens(), block_size, split)  # (n_blocks, block_size) view of the map
        if cfg.prepare_only:
            say(f"{split}: {prepared.path} {prepared.num_tokens} tokens {len(sequences)} blocks of {block_size}")
    return Examples(sequences[:limit] if limit else sequences)

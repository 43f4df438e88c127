"""Token ids -> blocks -> batches, and the one entry point the loop calls: prepare_data. No model in here."""

from __future__ import annotations

import math

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


class CausalCollator:
    """Pads a batch; the labels are the next token of each position. Causal batches carry no randomness."""

    def __init__(self, tokenizer, cfg=None, evaluation: bool = False):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, items, epoch: int = 0) -> dict:
        batch = pad_batch(items, self.pad_id)
        batch["labels"] = causal_labels(batch["input_ids"], batch["attention_mask"])
        return batch


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) labels where position t predicts token t+1; IGNORE after the last token and on padding."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE)
    return labels


class StepSampler(Sampler):
    """This rank's micro-batches of an epoch, optimizer step by optimizer step, in an order set by (seed, epoch).

    An epoch is a permutation of the n examples seeded by (seed, epoch), cut into steps of `step_size`
    examples: the global batch, batch_size x world x accumulation. Only an epoch's last step can be
    short. Rank r takes every world-th example of a step and cuts its share into micro-batches of
    `batch_size`. So a step holds the same examples on any number of processes (a run resumes
    exactly on another one, with the same global batch), and no sampler state needs saving: a
    resumed run rebuilds the permutation and starts at an example count.
    """

    def __init__(self, n: int, seed: int, batch_size: int, world: int = 1, rank: int = 0, accumulation: int = 1,
                 shuffle: bool = True):
        self.n, self.seed, self.batch_size, self.world, self.rank = n, seed, batch_size, world, rank
        self.step_size, self.shuffle = batch_size * world * accumulation, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; `start` (examples of all ranks) skips what was already trained on."""
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def steps(self):
        """(this rank's micro-batches, the number of micro-batches rank 0 has) of each step from `start` on.

        The two differ only in an epoch's short last step, where a rank may hold fewer examples than
        rank 0, or none.
        """
        order = self.order().tolist()
        for lo in range(self.start, self.n, self.step_size):
            step = order[lo:lo + self.step_size]
            mine = step[self.rank::self.world]
            most = math.ceil(math.ceil(len(step) / self.world) / self.batch_size)
            yield [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)], most

    def __iter__(self):
        for micro, _ in self.steps():
            yield from micro

    def __len__(self):
        return sum(len(micro) for micro, _ in self.steps())


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

"""Token ids -> blocks -> batches, and the one entry point the loop calls: prepare_data. No model in here."""

from __future__ import annotations

import hashlib
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


def short_block(ids: np.ndarray, block_size: int, split: str) -> np.ndarray:
    """(1, len(ids)): a split shorter than one block as the one shorter block it is. It is evaluated as any block,
    each labelled token weighing the same; only a split with nothing to predict is refused."""
    if len(ids) < 2:
        raise UsageError(f"the {split} text has {len(ids)} tokens: nothing to predict; add text")
    return ids[None, :]


def tokenize_lines(texts: list[str], tokenizer, max_length: int, desc: str = "tokenizing") -> list[np.ndarray]:
    """Line-by-line examples: every non-blank text on its own, truncated to max_length tokens."""
    lines = [t for t in texts if t.strip()]
    examples = []
    for start in tqdm(range(0, len(lines), 1000), desc=desc, unit="batch", leave=False, delay=1):
        enc = tokenizer(lines[start:start + 1000], add_special_tokens=True, truncation=True,
                        max_length=max_length, return_attention_mask=False)
        examples.extend(np.asarray(ids, dtype=np.int64) for ids in enc["input_ids"])
    return examples


def texts_in(starts: np.ndarray, lo: int, length: int) -> torch.Tensor:
    """(length,) int64: which text each token of the stream's [lo, lo + length) belongs to, numbered 1, 2, ...
    from the first one there. `starts` holds where each text of the stream starts (increasing, from 0)."""
    text = np.searchsorted(starts, np.arange(lo, lo + length), side="right")
    return torch.from_numpy(text - text[0] + 1)


class Examples(Dataset):
    """Token sequences (blocks of equal length, or lines of any length); an item is (index, ids).

    With `starts` (--document-boundaries: where each text starts in the stream the blocks were cut from)
    an item is (index, ids, texts): texts (T,) numbers each token's text within the block from 1.
    """

    def __init__(self, sequences, starts: np.ndarray | None = None):
        self.sequences, self.starts = sequences, starts

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        # int64 whatever the storage: blocks may be uint16 rows of a memory-mapped token file
        ids = torch.from_numpy(np.asarray(self.sequences[i], dtype=np.int64))
        if self.starts is None:
            return i, ids
        return i, ids, texts_in(self.starts, i * len(ids), len(ids))

    @property
    def num_tokens(self) -> int:
        if isinstance(self.sequences, np.ndarray):  # blocks: no walk over millions of memmap rows
            return int(self.sequences.size)
        return int(sum(len(s) for s in self.sequences))


def pad_batch(items, pad_id: int) -> dict:
    """Stack (index, ids) or (index, ids, texts) items, right-padding with pad_id: input_ids, attention_mask, index.

    The attention mask is 0 on padding and 1 on tokens, or each token's text number (1, 2, ...) where
    items carry texts: lm.losses.TokenLoss then keeps the texts of a row apart.
    """
    index = torch.tensor([item[0] for item in items])
    length = max(len(item[1]) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, (_, ids, *texts) in enumerate(items):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = texts[0] if texts else 1
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
    """(B, T) labels where position t predicts token t+1 of the same text; IGNORE after a text's last token
    (the block's last, or before another text under --document-boundaries) and on padding."""
    labels = torch.full_like(input_ids, IGNORE)
    same_text = (attention_mask[:, 1:] == attention_mask[:, :-1]) & attention_mask[:, 1:].bool()
    labels[:, :-1] = torch.where(same_text, input_ids[:, 1:], IGNORE)
    return labels


class Windows(Dataset):
    """Sliding windows over a split's whole token stream, for strided evaluation (--eval-stride, causal LM).

    Window k holds the tokens [k x stride, k x stride + block) of the stream (the last one reaches its end
    and may be shorter) and labels only the tokens no earlier window scored: every token but the first
    is scored once, from as much preceding context as its window gives. With stride = block these are
    the blocks, each scoring all its tokens but its first. `starts` (--document-boundaries) keeps texts
    apart: no label crosses from one text to the next. An item is (index, ids, labels, texts or None).
    """

    def __init__(self, ids: np.ndarray, block_size: int, stride: int, starts: np.ndarray | None = None):
        self.ids, self.block, self.stride, self.starts = ids, block_size, stride, starts
        self.count = 1 + math.ceil(max(len(ids) - block_size, 0) / stride)

    def __len__(self):
        return self.count

    def __getitem__(self, k):
        lo = k * self.stride
        ids = torch.from_numpy(np.asarray(self.ids[lo:lo + self.block], dtype=np.int64))
        # The first token this window scores: the stream's second, or the first the window before did not
        # reach (it ended at lo - stride + block); position t predicts token t + 1.
        first = 1 if k == 0 else max(1, self.block - self.stride)
        labels = torch.full_like(ids, IGNORE)
        labels[first - 1:-1] = ids[first:]
        texts = None
        if self.starts is not None:
            texts = texts_in(self.starts, lo, len(ids))
            labels[:-1][texts[1:] != texts[:-1]] = IGNORE
        return k, ids, labels, texts

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


class WindowCollator:
    """Pads a batch of Windows items; their labels come with them (the objective's collator is not used)."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, items, epoch: int = 0) -> dict:
        batch = pad_batch([(k, ids) if texts is None else (k, ids, texts) for k, ids, _, texts in items], self.pad_id)
        batch["labels"] = torch.full_like(batch["input_ids"], IGNORE)
        for row, (_, _, labels, _) in enumerate(items):
            batch["labels"][row, :len(labels)] = labels
        return batch


def fingerprint(sequences) -> str:
    """A digest of every token id of `sequences` (an (n, T) array of blocks, or a list of 1-D arrays), in order:
    whether a resumed run trains on the data its checkpoint did."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(sequences, np.ndarray):
        h.update(repr((sequences.shape, sequences.dtype.str)).encode())
        flat = sequences.reshape(-1)  # a view of the memory-mapped token file, read a slice at a time
        for lo in range(0, len(flat), FINGERPRINT_SLICE):
            h.update(np.ascontiguousarray(flat[lo:lo + FINGERPRINT_SLICE]).data)
    else:
        for ids in sequences:
            h.update(len(ids).to_bytes(8, "little"))
            h.update(np.ascontiguousarray(ids, dtype=np.int64).data)
    return h.hexdigest()


FINGERPRINT_SLICE = 1 << 24  # token ids hashed per read


class StepSampler(Sampler):
    """This rank's micro-batches of an epoch, optimizer step by optimizer step, in an order set by (seed, epoch).

    An epoch is a permutation of the n examples seeded by (seed, epoch), cut into steps of `step_size`
    examples: the global batch, batch_size x world x accumulation. Only an epoch's last step can be
    short. Rank r takes every world-th example of a step and cuts its share into micro-batches of
    `batch_size`. So a step holds the same examples on any number of processes (a run resumes
    exactly on another one, with the same global batch), and no sampler state needs saving: a
    resumed run rebuilds the permutation and starts at an example count.

    `pad` (evaluation): where a rank holds fewer micro-batches of a step than rank 0, it is given empty
    ones (no index) in their place, so every rank iterates as many batches.
    """

    def __init__(self, n: int, seed: int, batch_size: int, world: int = 1, rank: int = 0, accumulation: int = 1,
                 shuffle: bool = True, pad: bool = False):
        self.n, self.seed, self.batch_size, self.world, self.rank = n, seed, batch_size, world, rank
        self.step_size, self.shuffle, self.pad = batch_size * world * accumulation, shuffle, pad
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
        for micro, most in self.steps():
            yield from micro
            if self.pad:
                yield from [[] for _ in range(most - len(micro))]

    def __len__(self):
        return sum(most if self.pad else len(micro) for micro, most in self.steps())


# ---------------------------------------------------------------- a run's data

def prepare_data(cfg, tokenizer, block_size: int, world: distributed.World, say,
                 sources=None) -> tuple[Examples, Examples | Windows]:
    """(train, validation) examples of a run: rank 0 tokenizes, the other ranks then read its result.

    The validation examples are Windows with --eval-stride. `say` reports progress and counts (the
    caller decides who prints); `sources` is what texts.load_sources(cfg) returned, for a caller that
    checked the files already.
    """
    if cfg.eval_stride and cfg.eval_stride > block_size:
        raise UsageError(f"--eval-stride {cfg.eval_stride} is above the block size of {block_size}: "
                         "a window would skip tokens; use a stride of at most the block size")
    sources = sources if sources is not None else load_sources(cfg)

    def examples(report):
        limits, strides = (cfg.max_train_samples, cfg.max_eval_samples), (None, cfg.eval_stride)
        return tuple(examples_of(cfg, source, split, limit, tokenizer, block_size, report, stride)
                     for source, limit, split, stride in zip(sources, limits, ("train", "validation"), strides))

    # line by line: lists in memory, sent to the others; blocks: rank 0 fills the token cache, the
    # others then memory-map the same files. A user error on rank 0 stops every rank.
    sets = distributed.run_on_main(world, lambda: examples(say), send_result=cfg.line_by_line)
    train_set, eval_set = sets if sets is not None else examples(lambda *a, **k: None)
    if len(train_set) < world.size:
        raise UsageError(f"{len(train_set)} training blocks for {world.size} processes: each process needs at "
                         "least one; add text, lower --block-size or use fewer processes")
    what = (f"{len(eval_set)} validation windows (stride {cfg.eval_stride})" if cfg.eval_stride
            else f"{len(eval_set)} validation examples")
    say(f"data: {len(train_set)} train / {what} of <= {block_size} tokens")
    return train_set, eval_set


def examples_of(cfg, source, split: str, limit: int | None, tokenizer, block_size: int, say,
                stride: int | None = None) -> Examples | Windows:
    """One split's examples, at most `limit` blocks: blocks memory-mapped from the token cache, line-by-line
    lists, or with `stride` the windows over the first `limit` blocks' tokens."""
    if cfg.line_by_line:
        sequences = tokenize_lines(source.texts, tokenizer, block_size, desc=f"tokenizing {split}")
        if not sequences:
            raise UsageError(f"the {split} text has no non-empty line")
        return Examples(sequences[:limit] if limit else sequences)
    workers = cfg.preprocessing_workers or token_cache.default_workers()
    prepared = token_cache.prepare(source, tokenizer, cache_root(cfg.cache_dir), workers, split, say,
                                   documents=cfg.document_boundaries)
    if stride:
        ids = prepared.tokens()[:limit * block_size if limit else None]
        if len(ids) < 2:
            raise UsageError(f"the {split} text has {len(ids)} tokens: nothing to predict; add text")
        examples = Windows(ids, block_size, stride, prepared.starts())
        counts = f"{len(examples)} windows of {block_size}, stride {stride}"
    else:
        tokens = prepared.tokens()
        if split == "validation" and len(tokens) < block_size:  # e.g. the 5% split of a short file
            sequences = short_block(tokens, block_size, split)
            say(f"validation: {len(tokens)} tokens, fewer than one block of {block_size}: evaluated as one block "
                f"of {len(tokens)}")
        else:
            sequences = blocks_of(tokens, block_size, split)  # (n_blocks, block_size) view of the map
        examples = Examples(sequences[:limit] if limit else sequences, prepared.starts())
        counts = f"{len(sequences)} blocks of {sequences.shape[1]}"
    if cfg.prepare_only:
        say(f"{split}: {prepared.path} {prepared.num_tokens} tokens {counts}")
    return examples

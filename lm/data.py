"""Token ids -> blocks -> batches, and the one entry point the loop calls: prepare_data. No model in here."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from lm import distributed, documents, token_cache
from lm.embedded import cache_root
from lm.errors import UsageError
from lm.texts import Conversations, load_sources

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
    """Stack (index, ids), (index, ids, texts) or (index, ids, texts, loss_mask) items, right-padding with pad_id:
    input_ids, attention_mask, index, and loss_mask (0 on padding) where items carry one.

    The attention mask is 0 on padding and 1 on tokens, or each token's text number (1, 2, ...) where
    items carry texts: lm.losses.TokenLoss then keeps the texts of a row apart.
    """
    index = torch.tensor([item[0] for item in items])
    length = max(len(item[1]) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    masked = len(items[0]) > 3
    loss_mask = torch.zeros((len(items), length), dtype=torch.bool) if masked else None
    for row, (_, ids, *extra) in enumerate(items):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = extra[0] if extra else 1
        if masked:
            loss_mask[row, : len(ids)] = extra[1]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "index": index}
    return batch if loss_mask is None else {**batch, "loss_mask": loss_mask}


class CausalCollator:
    """Pads a batch; the labels are the next token of each position (where its loss mask is 1, for items that
    carry one). Causal batches carry no randomness."""

    def __init__(self, tokenizer, cfg=None, evaluation: bool = False):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, items, epoch: int = 0) -> dict:
        batch = pad_batch(items, self.pad_id)
        batch["labels"] = causal_labels(batch["input_ids"], batch["attention_mask"], batch.pop("loss_mask", None))
        return batch


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) labels where position t predicts token t+1 of the same text; IGNORE after a text's last token
    (the block's last, or before another text under --document-boundaries), on padding, and where token t+1's
    loss mask (B, T), if given, is 0 (a conversation's prompt)."""
    labels = torch.full_like(input_ids, IGNORE)
    same_text = (attention_mask[:, 1:] == attention_mask[:, :-1]) & attention_mask[:, 1:].bool()
    if loss_mask is not None:
        same_text &= loss_mask[:, 1:].bool()
    labels[:, :-1] = torch.where(same_text, input_ids[:, 1:], IGNORE)
    return labels


def pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Items of the given lengths (each <= capacity) in as few rows as best fit decreasing finds: each item, the
    longest first, goes to the row it fills most tightly. Rows list their items in increasing order, and come
    in the order of their first item."""
    free = [[] for _ in range(capacity + 1)]  # free[k]: the rows with k tokens of room
    rows = []
    for item in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[item])
        room = next((k for k in range(n, capacity + 1) if free[k]), None)
        if room is None:
            rows.append([])
            row, room = len(rows) - 1, capacity
        else:
            row = free[room].pop()
        rows[row].append(item)
        free[room - n].append(row)
    return sorted(sorted(row) for row in rows)


class ConversationRows(Dataset):
    """Conversations from the token cache in rows of at most `block_size` tokens: packed (each row holds whole
    conversations, as many as fit: they attend to themselves alone, lm.documents) or one per row. A
    conversation longer than a block is truncated to it. An item is (index, ids, texts, loss_mask): texts
    (T,) numbers each token's conversation within the row from 1; loss_mask (T,) is 1 where a token carries loss.
    """

    def __init__(self, ids: np.ndarray, loss_mask: np.ndarray, starts: np.ndarray, block_size: int, packed: bool,
                 limit: int | None = None):
        self.ids, self.mask = ids, loss_mask
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.diff(np.append(starts, len(ids)))
        members = pack(np.minimum(lengths, block_size), block_size) if packed else [[c] for c in range(len(starts))]
        members = members[:limit] if limit else members  # the first `limit` rows and their conversations
        self.order = np.array([c for row in members for c in row], dtype=np.int64)  # conversations, row by row
        self.rows = np.cumsum([0] + [len(row) for row in members])  # row r holds order[rows[r]:rows[r + 1]]
        self.starts, lengths = starts[self.order], lengths[self.order]
        self.kept = np.minimum(lengths, block_size)  # the tokens of each conversation that are trained on
        self.truncated = int((lengths > block_size).sum())

    def __len__(self):
        return len(self.rows) - 1

    def __getitem__(self, i):
        ids, texts, mask = self.row(i)
        return i, torch.from_numpy(ids), torch.from_numpy(texts), torch.from_numpy(mask)

    def row(self, i) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int64, texts int64, loss mask bool) of row i."""
        spans = [(self.starts[k], self.kept[k]) for k in range(self.rows[i], self.rows[i + 1])]
        ids = np.concatenate([np.asarray(self.ids[s:s + n], dtype=np.int64) for s, n in spans])
        mask = np.concatenate([np.asarray(self.mask[s:s + n], dtype=bool) for s, n in spans])
        texts = np.repeat(np.arange(1, len(spans) + 1, dtype=np.int64), [n for _, n in spans])
        return ids, texts, mask

    @property
    def sequences(self):
        """Each row's ids, texts and mask stacked (3, T): what fingerprint() digests."""
        return (np.stack(self.row(i)).astype(np.int64) for i in range(len(self)))

    @property
    def num_tokens(self) -> int:
        return int(self.kept.sum())

    def labelled_tokens(self) -> int:
        """Tokens that carry the loss: each conversation's after its first (which nothing predicts), in rows."""
        return int(sum(self.mask[s + 1:s + n].sum() for s, n in zip(self.starts.tolist(), self.kept.tolist())))


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
                 sources=None, packed: bool | None = None) -> tuple:
    """(train, validation) examples of a run: rank 0 tokenizes, the other ranks then read its result.

    The validation examples are Windows with --eval-stride; of conversations, both are ConversationRows,
    `packed` (default: unless --no-packing) or one per row. `say` reports progress and counts (the caller
    decides who prints); `sources` is what texts.load_sources(cfg) returned, for a caller that checked the
    files already.
    """
    if cfg.eval_stride and cfg.eval_stride > block_size:
        raise UsageError(f"--eval-stride {cfg.eval_stride} is above the block size of {block_size}: "
                         "a window would skip tokens; use a stride of at most the block size")
    sources = sources if sources is not None else load_sources(cfg)

    def examples(report):
        if isinstance(sources[0], Conversations):
            return conversation_rows(cfg, sources, tokenizer, block_size,
                                     not cfg.no_packing if packed is None else packed, report)
        limits, strides = (cfg.max_train_samples, cfg.max_eval_samples), (None, cfg.eval_stride)
        return tuple(examples_of(cfg, source, split, limit, tokenizer, block_size, report, stride)
                     for source, limit, split, stride in zip(sources, limits, ("train", "validation"), strides))

    # line by line: lists in memory, sent to the others; blocks: rank 0 fills the token cache, the
    # others then memory-map the same files. A user error on rank 0 stops every rank.
    sets = distributed.run_on_main(world, lambda: examples(say), send_result=cfg.line_by_line)
    train_set, eval_set = sets if sets is not None else examples(lambda *a, **k: None)
    if len(train_set) < world.size:  # alike on every rank
        raise distributed.EveryRankError(f"{len(train_set)} training blocks for {world.size} processes: each process "
                                         "needs at least one; add text, lower --block-size or use fewer processes")
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


def conversation_rows(cfg, sources, tokenizer, block_size: int, packed: bool, say) -> tuple:
    """(train, validation) ConversationRows of conversational sources, announced in one line: how many, the
    template, the share of tokens that carry loss and how many were truncated. A --chat-template becomes the
    tokenizer's: the model learns its format, so the tokenizer saved with the model (and a GGUF) must render it."""
    from lm import chats

    template = chats.load_template(tokenizer, cfg.chat_template)
    if cfg.chat_template:
        tokenizer.chat_template = template
    sets = []
    for source, limit, split in zip(sources, (cfg.max_train_samples, cfg.max_eval_samples), ("train", "validation")):
        prepared = token_cache.prepare_conversations(source, tokenizer, template, cache_root(cfg.cache_dir), split,
                                                     say)
        rows = ConversationRows(prepared.tokens(), prepared.loss_mask(), prepared.starts(), block_size, packed,
                                limit)
        if not len(rows):
            raise UsageError(f"the {split} data holds no conversation")
        if cfg.prepare_only:
            say(f"{split}: {prepared.path} {prepared.num_tokens} tokens {len(rows)} rows of <= {block_size}")
        sets.append(rows)
    train = sets[0]
    which = ((f"--chat-template {cfg.chat_template}" if cfg.chat_template else "the tokenizer's chat template")
             + (" (generation markers)" if chats.has_generation_markers(template) else ""))
    say(f"conversations: {len(train.starts)} train / {len(sets[1].starts)} validation "
        f"({sources[0].format}), {which}, loss on {sources[0].loss_on}: "
        f"{train.labelled_tokens() / max(train.num_tokens, 1):.1%} of {train.num_tokens:,} train tokens; "
        + (f"packed into {len(train)} rows of <= {block_size} tokens" if packed
           else f"one per row, padded to the batch's longest (<= {block_size})")
        + f"; truncated to {block_size} tokens: {sets[0].truncated} train / {sets[1].truncated} validation")
    return tuple(sets)


def texts_apart(cfg, sources, model_config, say) -> bool:
    """Whether rows hold several texts kept apart (lm.documents): --document-boundaries, refused where the
    architecture can't; packed conversations, padded one per row there instead, saying so."""
    conversations = isinstance(sources[0], Conversations)
    if conversations and cfg.no_packing:  # one conversation per row, whatever --document-boundaries says
        return False
    if cfg.document_boundaries:
        documents.check_architecture(model_config)
        return True
    if not conversations:
        return False
    if model_config.model_type not in documents.CAUSAL:
        say(f"packing keeps conversations apart in {', '.join(documents.CAUSAL)} models, not "
            f"{model_config.model_type}: one conversation per row, padded")
        return False
    return True

"""Properties of the pure pieces, over inputs hypothesis draws: grouping, the .txt convention, masking, the sampler."""

import functools
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.data import IGNORE, StepSampler, group_into_blocks
from lm.masking import MaskingCollator, example_generator, mask_tokens
from lm.texts import split_lines

quick = settings(max_examples=60, deadline=None)
seeds = st.integers(0, 2**32 - 1)


@quick
@given(length=st.integers(0, 300), block_size=st.integers(1, 40))
def test_grouping_keeps_every_token_in_order_but_the_final_remainder(length, block_size):
    ids = np.arange(length) * 7 + 3  # distinct ids: a token out of place or repeated shows
    blocks = group_into_blocks(ids, block_size)
    assert blocks.shape == (length // block_size, block_size)
    kept = blocks.size
    assert np.array_equal(blocks.ravel(), ids[:kept])
    assert length - kept < block_size


@quick
@given(st.lists(st.sampled_from(["a", " ", "é", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028",
                                 "\u2029"])).map("".join))
def test_split_lines_splits_at_newlines_only_and_loses_nothing(raw):
    pieces = split_lines(raw)
    text = raw.replace("\r\n", "\n")
    assert "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces[:-1])
    assert all("\n" not in p[:-1] for p in pieces)
    # one piece per "\n", plus an unterminated last line: the Unicode separators never start a piece
    assert len(pieces) == text.count("\n") + (text != "" and not text.endswith("\n"))


@quick
@given(ids=st.lists(st.integers(0, 999), min_size=1, max_size=200), data=st.data(),
       prob=st.floats(0.01, 0.99), seed=seeds)
def test_mask_tokens_labels_exactly_the_picked_maskable_positions(ids, data, prob, seed):
    ids = torch.tensor(ids)
    maskable = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids))))
    inputs, labels = mask_tokens(ids, maskable, prob, 1000, 1001, torch.Generator().manual_seed(seed))
    picked = labels != IGNORE
    assert not (picked & ~maskable).any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(inputs[~picked], ids[~picked])
    assert ((inputs >= 0) & (inputs <= 1000)).all()


@settings(max_examples=20, deadline=None)
@given(prob=st.floats(0.02, 0.98), seed=seeds)
def test_mask_tokens_picks_near_mlm_prob(prob, seed):
    n = 20_000
    ids = torch.arange(n) % 500 + 10
    inputs, labels = mask_tokens(ids, torch.ones(n, dtype=torch.bool), prob, 1, 510,
                                 torch.Generator().manual_seed(seed))
    picked = int((labels != IGNORE).sum())
    assert abs(picked - n * prob) < 5 * math.sqrt(n * prob * (1 - prob))  # 5 standard errors
    masked = int((inputs == 1).sum())  # 80% of the picked become the mask token
    assert abs(masked - picked * 0.8) < 5 * math.sqrt(picked * 0.8 * 0.2) + 1


def batchings(n: int):
    """Partitions of range(n) into batches, in any order: how a sampler and batch size may group examples."""
    return st.permutations(range(n)).flatmap(
        lambda order: st.lists(st.integers(1, n), min_size=n, max_size=n).map(lambda sizes: cut(order, sizes)))


def cut(order, sizes):
    batches, at = [], 0
    for size in sizes:
        if at < len(order):
            batches.append(order[at:at + size])
            at += size
    return batches


@quick
@given(data=st.data(), seed=seeds, epoch=st.integers(0, 5), prob=st.floats(0.05, 0.95))
def test_collator_masks_an_example_the_same_in_any_batch_and_never_special_or_padding(tokenizer, data, seed,
                                                                                      epoch, prob):
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    token = st.one_of(st.integers(1000, 5000), st.sampled_from(special.tolist()))  # specials inside lines too
    examples = data.draw(st.lists(st.lists(token, min_size=1, max_size=24), min_size=1, max_size=6))
    items = [(i, torch.tensor(ids)) for i, ids in enumerate(examples)]
    collate = functools.partial(MaskingCollator(tokenizer, prob, seed), epoch=epoch)

    def masks(batching):  # {example: (inputs, labels) over its real tokens}
        out = {}
        for indices in batching:
            batch = collate([items[i] for i in indices])
            for row, i in enumerate(indices):
                ids, n = items[i][1], len(examples[i])
                assert (batch["labels"][row, n:] == IGNORE).all()  # padding
                inputs, labels = batch["input_ids"][row, :n], batch["labels"][row, :n]
                picked = labels != IGNORE
                assert torch.equal(labels[picked], ids[picked]) and torch.equal(inputs[~picked], ids[~picked])
                assert not picked[torch.isin(ids, special)].any()
                out[i] = inputs, labels
        return out

    alone = masks([[i] for i in range(len(items))])
    other = masks(data.draw(batchings(len(items))))
    for i, (inputs, labels) in alone.items():
        assert torch.equal(other[i][0], inputs) and torch.equal(other[i][1], labels)
        # and the example's own generator over its ids alone gives that mask
        maskable = ~torch.isin(items[i][1], special)
        expected = mask_tokens(items[i][1], maskable, prob, tokenizer.mask_token_id, len(tokenizer),
                               example_generator(seed, 0, epoch, i))
        assert torch.equal(expected[0], inputs) and torch.equal(expected[1], labels)


def steps_of(n, seed, epoch, batch_size, world, accumulation, start=0):
    """Each step's examples over all ranks (as a sorted list), and whether every rank runs rank 0's micro-batch count."""
    samplers = [StepSampler(n, seed, batch_size, world, rank, accumulation) for rank in range(world)]
    for s in samplers:
        s.set_epoch(epoch, start=start)
    steps = []
    for per_rank in zip(*(s.steps() for s in samplers)):
        (rank0, most), others = per_rank[0], per_rank[1:]
        assert len(rank0) == most and all(len(micro) <= most for micro, m in others if m == most)
        assert all(m == most for _, m in others)
        assert all(len(mb) <= batch_size for micro, _ in per_rank for mb in micro)
        steps.append(sorted(i for micro, _ in per_rank for mb in micro for i in mb))
    return steps


@quick
@given(n=st.integers(1, 200), batch_size=st.integers(1, 5), world=st.integers(1, 6), accumulation=st.integers(1, 3),
       seed=seeds, epoch=st.integers(0, 3))
def test_an_epoch_is_its_order_cut_into_global_batches(n, batch_size, world, accumulation, seed, epoch):
    order = StepSampler(n, seed, 1)
    order.set_epoch(epoch)
    order = order.order().tolist()
    size = batch_size * world * accumulation
    assert steps_of(n, seed, epoch, batch_size, world, accumulation) == [
        sorted(order[k:k + size]) for k in range(0, n, size)]  # every example once; only the last step short


@quick
@given(world=st.integers(1, 6), resumed_world=st.integers(1, 6), per=st.integers(1, 3), n=st.integers(1, 100),
       seed=seeds, epoch=st.integers(0, 3), data=st.data())
def test_steps_are_the_same_on_another_number_of_processes_whatever_the_example_count(
        world, resumed_world, per, n, seed, epoch, data):
    unit = math.lcm(world, resumed_world)
    size = unit * per  # the global batch: b * N == b' * M, here with accumulation 1 and then per
    before = steps_of(n, seed, epoch, size // world, world, 1)
    done = data.draw(st.integers(0, len(before)))
    after = steps_of(n, seed, epoch, unit // resumed_world, resumed_world, per, start=done * size)
    assert after == before[done:]

import torch

from lm.data import IGNORE
from lm.masking import MaskingCollator, example_generator, mask_tokens
from lm.data import causal_labels


def test_mask_tokens_never_picks_unmaskable_positions_and_labels_only_picked():
    ids = torch.arange(1000, 5000)
    maskable = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    inputs, labels = mask_tokens(ids, maskable, 0.3, mask_token_id=7, vocab_size=9000,
                                 generator=torch.Generator().manual_seed(1))
    picked = labels != IGNORE
    assert not (picked & ~maskable).any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(inputs[~picked], ids[~picked])
    share = picked.sum() / maskable.sum()
    assert 0.25 < share < 0.35
    assert (inputs[picked] == 7).float().mean() > 0.7


def test_mask_tokens_is_a_function_of_the_generator():
    ids = torch.arange(100, 400)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    a = mask_tokens(ids, maskable, 0.15, 1, 500, example_generator(0, 0, 0, 5))
    b = mask_tokens(ids, maskable, 0.15, 1, 500, example_generator(0, 0, 0, 5))
    c = mask_tokens(ids, maskable, 0.15, 1, 500, example_generator(0, 0, 1, 5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_collator_masks_are_fresh_per_epoch_fixed_for_evaluation_and_independent_of_batching(tokenizer):
    items = [(i, torch.tensor(tokenizer("the quick brown fox jumps over the lazy dog " * 5)["input_ids"]))
             for i in range(4)]
    train = MaskingCollator(tokenizer, 0.15, seed=0)
    e0 = train(items)["labels"]
    assert torch.equal(train(items, epoch=0)["labels"], e0)
    e1 = train(items, epoch=1)["labels"]
    assert not torch.equal(e0, e1)
    halves = torch.cat([train(items[:2])["labels"], train(items[2:])["labels"]])
    assert torch.equal(halves, e0)  # a mask belongs to (epoch, example), not to the batch
    evaluation = MaskingCollator(tokenizer, 0.15, seed=0, evaluation=True)
    assert torch.equal(evaluation(items)["labels"], evaluation(items)["labels"])
    assert not torch.equal(evaluation(items)["labels"], e0)


def test_evaluation_masks_are_the_same_whatever_the_seed(tokenizer):
    # one validation set for every run: the perplexities of runs with another --seed compare
    items = [(i, torch.tensor(tokenizer("the quick brown fox jumps over the lazy dog " * 5)["input_ids"]))
             for i in range(4)]
    evaluation = [MaskingCollator(tokenizer, 0.15, seed=s, evaluation=True)(items)["labels"] for s in (1, 2)]
    assert torch.equal(evaluation[0], evaluation[1])
    train = [MaskingCollator(tokenizer, 0.15, seed=s)(items)["labels"] for s in (1, 2)]
    assert not torch.equal(train[0], train[1])


def test_collator_never_masks_special_tokens_or_padding(tokenizer):
    items = [(0, torch.tensor(tokenizer("a b c d e f g h " * 20)["input_ids"])), (1, torch.tensor([101, 2000, 102]))]
    collate = MaskingCollator(tokenizer, 0.9, seed=0)
    batch = collate(items)
    picked = batch["labels"] != IGNORE
    special = torch.isin(batch["labels"], torch.tensor(tokenizer.all_special_ids))
    assert not special.any()
    assert not (picked & (batch["attention_mask"] == 0)).any()
    assert picked.any()


def test_causal_labels_predict_the_next_token_and_ignore_padding():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert causal_labels(ids, mask).tolist() == [[2, 3, 4, IGNORE], [6, IGNORE, IGNORE, IGNORE]]


def test_line_by_line_masks_do_not_depend_on_padding(tokenizer):
    lines = ["short line", "a somewhat longer line of words to mask", "x", "the longest line of them all " * 4]
    items = [(i, torch.tensor(tokenizer(t)["input_ids"])) for i, t in enumerate(lines)]
    collate = MaskingCollator(tokenizer, 0.5, seed=0)

    def real(batches):  # (inputs, labels) of each example over its real tokens, in example order
        out = []
        for batch in batches:
            b = collate(batch)
            for row, (_, ids) in enumerate(batch):
                out.append((b["input_ids"][row, :len(ids)], b["labels"][row, :len(ids)]))
                assert (b["labels"][row, len(ids):] == IGNORE).all()  # padding never picked
        return out

    together = real([items])
    for batches in ([[it] for it in items], [items[:2], items[2:]], [items[1:3], [items[0], items[3]]]):
        apart = real(batches)
        order = [i for batch in batches for i, _ in batch]
        for k, i in enumerate(order):
            assert torch.equal(apart[k][0], together[i][0]) and torch.equal(apart[k][1], together[i][1])

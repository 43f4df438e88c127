import json

import numpy as np
import pytest
import torch

from lm.config import Config
from lm.data import (IGNORE, CausalCollator, Examples, StepSampler, WindowCollator, Windows, causal_labels,
                     group_into_blocks, pad_batch, prepare_data, texts_in)
from lm.distributed import World
from lm.errors import UsageError
from lm.texts import hold_out, read_texts, split_lines


def files_config(folder, texts: list[str], **options) -> Config:
    """An MLM config reading the texts from train.txt and valid.txt in `folder`, caching there too."""
    for name in ("train.txt", "valid.txt"):
        (folder / name).write_text("".join(texts), encoding="utf-8")
    return Config.for_task("mlm", train_file=str(folder / "train.txt"), validation_file=str(folder / "valid.txt"),
                           cache_dir=str(folder / "cache"), preprocessing_workers=1, **options)


def test_split_lines_keeps_newlines_and_empty_lines():
    assert split_lines("a\n\nb\r\nc") == ["a\n", "\n", "b\n", "c"]
    assert split_lines("a\n") == ["a\n"]


def test_read_texts_formats(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    (tmp_path / "t.csv").write_text("id,body\n1,hello\n2,\"multi\nline\"\n", encoding="utf-8")
    (tmp_path / "t.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n', encoding="utf-8")
    (tmp_path / "t.json").write_text(json.dumps([{"body": "p"}, {"body": "q"}]), encoding="utf-8")
    assert read_texts(str(tmp_path / "t.txt")) == ["one\n", "\n", "two\n"]
    assert read_texts(str(tmp_path / "t.csv"), "body") == ["hello", "multi\nline"]
    assert read_texts(str(tmp_path / "t.jsonl"), "body") == ["x", "y"]
    assert read_texts(str(tmp_path / "t.json"), "body") == ["p", "q"]
    with pytest.raises(UsageError, match="no column 'text'"):
        read_texts(str(tmp_path / "t.csv"))


def test_csv_and_jsonl_records_split_only_on_newlines(tmp_path):
    odd = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"  # line breaks to str.splitlines, not to csv or jsonl
    rows = [{"text": odd}, {"text": "plain"}]
    (tmp_path / "t.csv").write_text(f"id,text\r\n1,{odd}\r\n2,plain\n", encoding="utf-8", newline="")
    (tmp_path / "t.jsonl").write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                      encoding="utf-8", newline="")
    assert read_texts(str(tmp_path / "t.csv")) == [odd, "plain"]
    assert read_texts(str(tmp_path / "t.jsonl")) == [odd, "plain"]


def test_a_json_file_of_one_record_a_line_reads_as_jsonl(tmp_path):
    # datasets' json loader (run_clm.py's) reads both in a .json file
    (tmp_path / "t.json").write_text('{"text": "x"}\n{"text": "y"}\n', encoding="utf-8")
    assert read_texts(str(tmp_path / "t.json")) == ["x", "y"]
    for name in ("t.json", "t.jsonl"):  # an error names the file's line, not the record's
        (tmp_path / name).write_text('{"text": "x"}\n\n{"text": \n', encoding="utf-8")
        with pytest.raises(UsageError, match="invalid JSON \\(Expecting value at line 3\\)"):
            read_texts(str(tmp_path / name))


def test_a_byte_order_mark_opening_a_file_is_no_text(tmp_path):
    (tmp_path / "t.csv").write_text("\ufefftext,id\nhello,1\n", encoding="utf-8")  # as Excel saves UTF-8 .csv
    (tmp_path / "t.jsonl").write_text('\ufeff{"text": "x"}\n', encoding="utf-8")
    (tmp_path / "t.txt").write_text("\ufeffone\ntwo\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "t.csv")) == ["hello"]
    assert read_texts(str(tmp_path / "t.jsonl")) == ["x"]
    assert read_texts(str(tmp_path / "t.txt")) == ["one\n", "two\n"]


@pytest.mark.parametrize("name, content", [
    ("t.jsonl", '{"text": "a"}\n{"text": null}\n'),  # a null
    ("t.json", json.dumps([{"text": "a"}, {"text": 3}])),  # not a string
    ("t.csv", "id,text\n1,a\n2\n"),  # a row short of the column
])
def test_a_record_without_a_text_is_refused_not_read_as_none(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match="column 'text': record 2 holds .*, not a text"):
        read_texts(str(tmp_path / name))


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"caf\xe9\n", "not UTF-8")])
def test_read_texts_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        read_texts(str(path))


def test_group_into_blocks_drops_only_the_final_remainder():
    blocks = group_into_blocks(np.arange(10), 3)
    assert blocks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert group_into_blocks(np.arange(2), 3).shape == (0, 3)


def test_blocks_span_text_boundaries(tokenizer, tmp_path):
    texts = ["alpha beta gamma\n"] * 50
    ids = np.array([i for t in texts for i in tokenizer(t)["input_ids"]])
    examples, _ = prepare_data(files_config(tmp_path, texts), tokenizer, 16, World(), print)
    assert len(examples) == len(ids) // 16
    assert np.array_equal(np.concatenate(examples.sequences), ids[: len(examples) * 16])
    first_three, _ = prepare_data(files_config(tmp_path, texts, max_train_samples=3), tokenizer, 16, World(), print)
    assert len(first_three) == 3
    with pytest.raises(UsageError, match="fewer than one block"):
        prepare_data(files_config(tmp_path, ["hi\n"]), tokenizer, 16, World(), print)


def test_line_by_line_skips_blank_lines_and_truncates(tokenizer, tmp_path):
    cfg = files_config(tmp_path, ["short\n", "\n", "   \n", "word " * 100 + "\n"], line_by_line=True)
    examples, _ = prepare_data(cfg, tokenizer, 8, World(), print)
    assert [len(s) for s in examples.sequences] == [3, 8]


def test_hold_out_takes_the_first_percent():
    train, valid = hold_out([str(i) for i in range(100)], 5)
    assert valid == ["0", "1", "2", "3", "4"] and train[0] == "5" and len(train) == 95


def test_pad_batch_pads_right_with_a_mask():
    batch = pad_batch([(4, torch.tensor([5, 6, 7])), (9, torch.tensor([8]))], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["index"].tolist() == [4, 9]


def examples_in(sampler) -> list[int]:
    return [i for micro in sampler for i in micro]


def test_step_sampler_order_depends_only_on_seed_and_epoch():
    a, b = StepSampler(50, seed=1, batch_size=4), StepSampler(50, seed=1, batch_size=4)
    first = examples_in(a)
    assert first == examples_in(b) and sorted(first) == list(range(50))
    a.set_epoch(1)
    assert examples_in(a) != first and sorted(examples_in(a)) == list(range(50))
    a.set_epoch(0, start=20)
    assert examples_in(a) == first[20:]


def test_step_sampler_shards_are_disjoint_and_interleave_to_the_single_order():
    single = examples_in(StepSampler(40, seed=3, batch_size=8))
    shards = [examples_in(StepSampler(40, seed=3, batch_size=4, world=2, rank=r)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(40))
    # global batch i of a 2-rank run holds the same examples as batch i of size 2*B in one process
    b = 4
    for i in range(5):
        assert sorted(shards[0][i * b:(i + 1) * b] + shards[1][i * b:(i + 1) * b]) == sorted(single[i * 2 * b:(i + 1) * 2 * b])


def test_a_short_last_step_tells_each_rank_how_many_micro_batches_rank_0_runs():
    # 9 examples, global batch 8 (2 ranks x 2 x accumulation 2): a full step, then one example for rank 0 alone
    steps = [list(StepSampler(9, seed=0, batch_size=2, world=2, rank=r, accumulation=2).steps()) for r in (0, 1)]
    assert [(len(micro), most) for micro, most in steps[0]] == [(2, 2), (1, 1)]
    assert [(len(micro), most) for micro, most in steps[1]] == [(2, 2), (0, 1)]


def test_a_padded_sampler_gives_every_rank_as_many_batches_and_each_example_once():
    # evaluation's: 9 examples, batch 4 on 2 ranks; the last example is rank 0's alone, rank 1 gets an empty batch
    samplers = [StepSampler(9, seed=0, batch_size=4, world=2, rank=r, shuffle=False, pad=True) for r in (0, 1)]
    assert [list(s) for s in samplers] == [[[0, 2, 4, 6], [8]], [[1, 3, 5, 7], []]]
    assert [len(s) for s in samplers] == [2, 2]
    assert len(StepSampler(9, seed=0, batch_size=4, world=2, rank=1, shuffle=False)) == 1  # unpadded: one fewer


def test_blocks_number_the_texts_they_hold_from_the_stream_starts():
    starts = np.array([0, 3, 4, 9, 13])  # texts [0, 3), [3, 4), [4, 9), [9, 13), [13, ...)
    assert texts_in(starts, 0, 5).tolist() == [1, 1, 1, 2, 3]
    assert texts_in(starts, 5, 5).tolist() == [1, 1, 1, 1, 2]  # a block starting mid-text: its tail is text 1
    blocks = Examples(group_into_blocks(np.arange(15), 5), starts)
    index, ids, texts = blocks[2]
    assert index == 2 and ids.tolist() == [10, 11, 12, 13, 14] and texts.tolist() == [1, 1, 1, 2, 2]
    batch = CausalCollator(type("Tokenizer", (), {"pad_token_id": 0})())([blocks[0], blocks[2]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 2, 3], [1, 1, 1, 2, 2]]
    assert batch["labels"].tolist() == [[1, 2, IGNORE, IGNORE, IGNORE], [11, 12, IGNORE, 14, IGNORE]]


def test_causal_labels_of_one_text_per_row_are_unchanged():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    assert causal_labels(ids, torch.tensor([[1, 1, 1], [1, 1, 0]])).tolist() == [[6, 7, IGNORE], [9, IGNORE, IGNORE]]


def window_labels(windows) -> list[tuple[list[int], list[int]]]:
    return [(ids.tolist(), labels.tolist()) for _, ids, labels, _ in (windows[k] for k in range(len(windows)))]


def test_strided_windows_score_every_token_but_the_first_once():
    # tokens 0..9 (ids equal to positions), windows of 4 every 2: by hand
    _ = IGNORE
    assert window_labels(Windows(np.arange(10), 4, 2)) == [
        ([0, 1, 2, 3], [1, 2, 3, _]),  # the first window scores all it can: tokens 1, 2, 3
        ([2, 3, 4, 5], [_, 4, 5, _]),  # then 4 and 5, each with 2 or 3 tokens of context
        ([4, 5, 6, 7], [_, 6, 7, _]),
        ([6, 7, 8, 9], [_, 8, 9, _]),  # reaches the end: the last window
    ]
    # 11 tokens: one more window, shorter, for the last token; stride 3 leaves 1 token of overlap
    assert window_labels(Windows(np.arange(11), 4, 2))[-1] == ([8, 9, 10], [_, 10, _])
    assert window_labels(Windows(np.arange(9), 4, 3)) == [
        ([0, 1, 2, 3], [1, 2, 3, _]), ([3, 4, 5, 6], [4, 5, 6, _]), ([6, 7, 8], [7, 8, _])]
    assert window_labels(Windows(np.arange(3), 4, 1)) == [([0, 1, 2], [1, 2, _])]  # shorter than a block
    for n, block, stride in [(50, 8, 3), (64, 16, 16), (37, 5, 1), (20, 20, 7)]:  # each token once, whatever the sizes
        scored = sorted(label for _, labels in window_labels(Windows(np.arange(n), block, stride))
                        for label in labels if label != IGNORE)
        assert scored == (list(range(1, n)) if stride < block else [t for t in range(1, n) if t % block])


def test_a_stride_of_the_block_size_gives_the_blocks_and_their_labels():
    ids = np.arange(100, 164)
    windows, blocks = Windows(ids, 16, 16), Examples(group_into_blocks(ids, 16))
    collate = CausalCollator(type("Tokenizer", (), {"pad_token_id": 0})())
    by_window = WindowCollator(type("Tokenizer", (), {"pad_token_id": 0})())([windows[k] for k in range(4)])
    by_block = collate([blocks[k] for k in range(4)])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(by_window[key], by_block[key]), key


def test_windows_keep_texts_apart_and_pad_the_last_one():
    starts = np.array([0, 5, 7])  # texts [0, 5), [5, 7), [7, 11)
    windows = Windows(np.arange(11), 6, 3, starts)
    _, ids, labels, texts = windows[1]  # tokens 3..8
    assert texts.tolist() == [1, 1, 2, 2, 3, 3]
    assert labels.tolist() == [IGNORE, IGNORE, 6, IGNORE, 8, IGNORE]  # 4 -> 5 would cross into the next text
    batch = WindowCollator(type("Tokenizer", (), {"pad_token_id": 0})())([windows[1], windows[2]])
    assert batch["attention_mask"].tolist() == [[1, 1, 2, 2, 3, 3], [1, 2, 2, 2, 2, 0]]
    assert batch["labels"][1].tolist() == [IGNORE, IGNORE, 9, 10, IGNORE, IGNORE] and batch["input_ids"][1, -1] == 0

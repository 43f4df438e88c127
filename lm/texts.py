"""Where texts come from: files, the Hub, the embedded corpus; the .txt convention and the hold-out split.

Importable without torch: tokenizing worker processes import it and start in a fraction of a second.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from lm.errors import UsageError

TEXT_SUFFIXES = (".txt", ".csv", ".json", ".jsonl")
SCAN_BYTES = 1 << 24  # what one read of a .txt file's hold-out scan takes

# Every 10th reference-manual topic (in sorted order) is validation: deterministic, by topic.
VALIDATION_EVERY = 10


# ---------------------------------------------------------------- the .txt convention

def split_lines(raw: str) -> list[str]:
    """Split on '\\n' (and '\\r\\n'), each line keeping its line break; a last line without one is kept."""
    lines = raw.replace("\r\n", "\n").split("\n")
    texts = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        texts.append(lines[-1])
    return texts


def bom_length(data: bytes) -> int:
    """The length of the UTF-8 byte-order mark opening `data` (0 without one): an editor's marker, not text."""
    return len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0


def not_utf8(path: str, byte: int) -> UsageError:
    return UsageError(f"{path}: not UTF-8 text (byte {byte}); convert it, e.g. with iconv -t utf-8")


# ---------------------------------------------------------------- reading files

def read_texts(path: str, text_column: str = "text") -> list[str]:
    """The texts of one file. A .txt gives one text per line, its newline kept, empty lines too."""
    rows = read_rows(path)
    if isinstance(rows, str):
        return split_lines(rows)
    if not rows or not all(isinstance(r, dict) and text_column in r for r in rows):
        columns = sorted(rows[0]) if rows and isinstance(rows[0], dict) else []
        raise UsageError(f"{path}: no column {text_column!r} in every record (columns: {', '.join(columns) or 'none'}); "
                         "choose one with --text-column")
    return checked_texts([r[text_column] for r in rows], f"{path}: column {text_column!r}")


def checked_texts(texts: list, where: str) -> list[str]:
    """`texts` if every one is a string; else a UsageError naming the first that is not. A null in JSON or a .csv
    row short of the column would otherwise be trained on as the word 'None' (an empty Hub cell: a traceback)."""
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise UsageError(f"{where}: record {bad + 1} holds {texts[bad]!r}, not a text; fix or drop that record")
    return texts


def read_rows(path: str) -> str | list:
    """A .txt file's whole text, or the records of a .csv/.json/.jsonl file (dicts, unless the file is odd)."""
    p = check_text_file(path)
    try:
        data = p.read_bytes()
        skip = bom_length(data)
        raw = data[skip:].decode("utf-8")  # as read, '\r\n' too: the .txt convention and csv handle it
    except UnicodeDecodeError as e:
        raise not_utf8(path, skip + e.start) from None
    except OSError as e:  # os.access says yes to root, and some filesystems refuse reads it can't foresee
        raise UsageError(f"{path}: cannot be read ({e.strerror}); check the file and its permissions") from None
    if not raw.strip():
        raise UsageError(f"{path}: the file is empty")
    if p.suffix == ".txt":
        return raw
    # Records end at newlines only: str.splitlines would also break on \x0c, \x85, U+2028 and others
    if p.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(raw, newline="")))  # as csv wants a file opened with newline=""
    if p.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise invalid_json(path, e) from None
            data = None  # one record a line, which datasets' json loader (run_clm.py's) reads in a .json file too
        if data is not None:
            return data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else []
    rows = []
    for number, line in enumerate(raw.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line.removesuffix("\r")))
            except json.JSONDecodeError as e:
                raise invalid_json(path, e, number) from None
    return rows


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
    if p.stat().st_size <= SCAN_BYTES and not p.read_bytes().strip():  # a big file is checked as it streams
        raise UsageError(f"{path}: the file is empty")
    return p


def first_record(path: str):
    """The first record of a .jsonl file (its first line that holds more than whitespace), or None."""
    check_text_file(path)
    with open(path, encoding="utf-8-sig", errors="replace", newline="\n") as f:  # records end at newlines only
        line = next((line for line in f if line.strip()), None)
    return _json(line.removesuffix("\n").removesuffix("\r"), path) if line is not None else None


def _json(text: str, path: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise invalid_json(path, e) from None


def invalid_json(path: str, e: json.JSONDecodeError, line: int | None = None) -> UsageError:
    """The error of a file that is not JSON; `line`: the file's line that held the record (one a line)."""
    return UsageError(f"{path}: invalid JSON ({e.msg} at line {line or e.lineno})")


# ---------------------------------------------------------------- the hold-out split

def held_out_count(n_texts: int, percentage: float) -> int:
    """How many of the first texts are validation when `percentage` percent are held out: the one rule."""
    n = max(1, int(n_texts * percentage / 100))
    if n >= n_texts:
        raise UsageError(f"too few texts ({n_texts}) to hold out {percentage}% for validation; "
                         "pass --validation-file")
    return n


def hold_out(texts: list[str], percentage: float) -> tuple[list[str], list[str]]:
    """(train, validation): the first `percentage` percent of the texts become validation."""
    n = held_out_count(len(texts), percentage)
    return texts[n:], texts[:n]


def held_out_bytes(path: str, percentage: float) -> int:
    """Where hold_out would cut a .txt file's lines, as a byte offset: two streaming passes, no texts in memory."""
    newlines, last, seen_bytes = 0, b"\n", 0
    decoder = codecs.getincrementaldecoder("utf-8")()  # this pass reads every byte: check them too
    with open(path, "rb") as f:
        while block := f.read(SCAN_BYTES):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise not_utf8(path, seen_bytes + e.start) from None
            seen_bytes += len(block)
            newlines += block.count(b"\n")
            last = block[-1:]
    n = held_out_count(newlines + (last != b"\n"), percentage)  # the lines split_lines gives
    cut, seen = 0, 0
    with open(path, "rb") as f:
        while block := f.read(SCAN_BYTES):
            count = block.count(b"\n")
            if seen + count >= n:
                at = -1
                for _ in range(n - seen):
                    at = block.find(b"\n", at + 1)
                return cut + at + 1
            seen, cut = seen + count, cut + len(block)
    return cut


# ---------------------------------------------------------------- the Hub and the embedded corpus

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
    ds = load_hub_dataset(name, config)
    if text_column not in ds["train"].column_names:
        raise UsageError(f"dataset {name!r} has no column {text_column!r} "
                         f"(columns: {', '.join(ds['train'].column_names)}); choose one with --text-column")
    train = checked_texts(list(ds["train"][text_column]), f"dataset {name!r}, column {text_column!r}")
    if "validation" in ds:
        return train, checked_texts(list(ds["validation"][text_column]),
                                    f"dataset {name!r} (validation), column {text_column!r}")
    return hold_out(train, pct)


@functools.lru_cache(maxsize=1)  # asked twice a run (are they conversations? then the texts): one Hub check, one load
def load_hub_dataset(name: str, config: str | None):
    """A Hub dataset's splits (a DatasetDict with a train split), from the Hub or, offline, from its cache."""
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
    return ds


def python_docs_texts() -> tuple[list[str], list[str]]:
    """Python's reference-manual topics (pydoc_data), one text per topic, as (train, validation)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [topics[n] for i, n in enumerate(names) if i % VALIDATION_EVERY]
    validation = [topics[n] for i, n in enumerate(names) if i % VALIDATION_EVERY == 0]
    return train, validation


# ---------------------------------------------------------------- a run's sources

@dataclass(frozen=True)
class TextFile:
    """A .txt file streamed from disk: all its lines, or one side of the hold-out split of `hold_out`."""

    path: str
    part: str = "all"  # "all", "train" (the lines after the held-out ones) or "validation" (the first ones)
    percentage: float = 0.0

    def identity(self) -> dict:
        # The file's metadata, not its bytes (a big corpus is not read to be keyed). The change time too: a file
        # edited and given its old modification time back (cp -p, rsync -t, tar x, touch -r) is another file.
        st = os.stat(self.path)
        return {"file": os.path.realpath(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
                "part": self.part, "percentage": self.percentage if self.part != "all" else None}

    def byte_range(self) -> tuple[int, int]:
        """[start, end) of this part's lines in the file."""
        size = os.path.getsize(self.path)
        if self.part == "all" or size == 0:
            return 0, size
        cut = held_out_bytes(self.path, self.percentage)
        return (cut, size) if self.part == "train" else (0, cut)


@dataclass(frozen=True, eq=False)
class TextList:
    """Texts already in memory: a Hub dataset, the embedded corpus, a .csv/.json file."""

    texts: list

    def identity(self) -> dict:
        # The content itself: covers a Hub dataset's revision and the Python version of the embedded corpus.
        h = hashlib.blake2b(digest_size=20)
        for t in self.texts:
            b = t.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return {"texts": len(self.texts), "content": h.hexdigest()}


@dataclass(frozen=True, eq=False)
class Conversations:
    """Conversations in memory: message lists ({"role", "content"}, as lm.chats reads them), each rendered by a
    chat template (`template_file`, else the tokenizer's) with the loss on the tokens `loss_on` picks."""

    conversations: list
    format: str  # "messages" or "prompt-completion" (lm.chats.conversation_format)
    loss_on: str  # lm.chats.LOSS_RULES
    template_file: str | None = None

    def identity(self) -> dict:
        # The messages alone: the template and the loss rule join the token cache's key on their own.
        h = hashlib.blake2b(digest_size=20)
        h.update(json.dumps(self.conversations, sort_keys=True).encode("utf-8", "surrogatepass"))
        return {"conversations": len(self.conversations), "content": h.hexdigest()}


@dataclass(frozen=True)
class ChatPrompt:
    """The turns of a held-out conversation before its first answer: --sample-every samples the reply."""

    messages: tuple
    template_file: str | None

    def ids(self, tokenizer) -> list[int]:
        """The turns rendered with the template's generation prompt (the opening of an assistant turn)."""
        from lm import chats

        text = tokenizer.apply_chat_template(list(self.messages), chat_template=chats.load_template(
            tokenizer, self.template_file), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]


CHAT_OPTIONS = ("chat_template", "loss_on", "no_packing")


def conversations_chosen(cfg, rows: list) -> bool:
    """Whether records are read as conversations: they have a 'messages' or 'prompt'/'completion' column, and
    --text-column names none of their columns (one named, other than the default, reads that column as text)."""
    from lm import chats

    first = rows[0] if rows and isinstance(rows[0], dict) else {}
    return bool(chats.conversation_format(rows)) and (cfg.text_column == "text" or cfg.text_column not in first)


def conversational_sources(cfg) -> tuple[Conversations, Conversations] | None:
    """(train, validation) conversations when the data has a `messages` or `prompt`/`completion` column (or
    is the embedded conversational set), else None: plain text, as ever."""
    from lm import chats

    if cfg.data_source == "files" and Path(cfg.train_file).suffix in (".json", ".jsonl"):
        # a .jsonl of plain texts is read once, as texts later: its first record tells
        jsonl = Path(cfg.train_file).suffix == ".jsonl"
        first = [first_record(cfg.train_file)] if jsonl else None
        rows = ([] if jsonl and not conversations_chosen(cfg, first) else read_rows(cfg.train_file))
        train = conversations_chosen(cfg, rows) and chats.read_conversations(rows, cfg.train_file)
        validation = None
        if train and cfg.validation_file:
            rows = read_rows(cfg.validation_file)
            if not chats.conversation_format(rows):
                raise UsageError(f"{cfg.validation_file}: not conversations (no 'messages' or 'prompt'/'completion' "
                                 f"column), while {cfg.train_file} holds them; give validation conversations")
            validation = chats.read_conversations(rows, cfg.validation_file)
    elif cfg.data_source == "hub" and cfg.dataset == chats.EMBEDDED_CHATS:
        train, validation = chats.python_docs_conversations()
        train, validation = (train, "messages"), (validation, "messages")
    elif cfg.data_source == "hub":
        ds = load_hub_dataset(cfg.dataset, cfg.dataset_config)
        columns = [dict.fromkeys(ds["train"].column_names)]  # the columns tell: plain texts stay in Arrow
        train = conversations_chosen(cfg, columns) and chats.read_conversations(ds["train"].to_list(),
                                                                                 f"dataset {cfg.dataset}")
        validation = (chats.read_conversations(ds["validation"].to_list(), f"dataset {cfg.dataset} (validation)")
                      if train and "validation" in ds else None)
    else:
        train = None
    if not train:
        given = [f"--{name.replace('_', '-')}" for name in CHAT_OPTIONS if getattr(cfg, name)]
        if given:
            raise UsageError(f"{given[0]} is for conversational data (a 'messages' or 'prompt'/'completion' column "
                             "in a .json/.jsonl file or a Hub dataset); this data is plain text")
        return None
    (conversations, fmt), validation = train, validation
    check_conversational(cfg, fmt)
    if validation is None:
        n = held_out_count(len(conversations), cfg.validation_split_percentage)
        conversations, validation = conversations[n:], (conversations[:n], fmt)
    loss_on = cfg.loss_on or ("completion" if fmt == "prompt-completion" else "assistant")
    return (Conversations(conversations, fmt, loss_on, cfg.chat_template),
            Conversations(validation[0], validation[1], loss_on, cfg.chat_template))


def check_conversational(cfg, fmt: str) -> None:
    """Refuse the options that conversations of format `fmt` can't train with."""
    from lm.objectives import find

    if not find(cfg.task).loss_mask:
        raise UsageError(f"conversational data trains a causal LM on chosen tokens; the {cfg.task} objective has "
                         "no per-token loss mask: use train_clm.py")
    if cfg.line_by_line:
        raise UsageError("--line-by-line is for plain text: conversations are one example each already")
    if cfg.eval_stride:
        raise UsageError("--eval-stride slides windows over a stream of text; conversations are scored one by one, "
                         "each whole: drop --eval-stride")
    if cfg.loss_on == "completion" and fmt != "prompt-completion":
        raise UsageError("--loss-on completion needs prompt/completion records; these are 'messages' "
                         "conversations: use --loss-on assistant")
    if cfg.chat_template and not Path(cfg.chat_template).is_file():
        raise UsageError(f"--chat-template {cfg.chat_template}: no such file")


def load_sources(cfg) -> tuple:
    """(train, validation) sources. A .txt file is only checked here, so that it can stream later."""
    conversations = conversational_sources(cfg)
    if conversations is not None:
        return conversations
    def streamed(path):
        return Path(path).suffix == ".txt" and not cfg.line_by_line  # line-by-line keeps its lists

    if cfg.data_source == "files" and streamed(cfg.train_file):
        check_text_file(cfg.train_file)
        if not cfg.validation_file:
            pct = cfg.validation_split_percentage
            return TextFile(cfg.train_file, "train", pct), TextFile(cfg.train_file, "validation", pct)
        if streamed(cfg.validation_file):
            check_text_file(cfg.validation_file)
            return TextFile(cfg.train_file), TextFile(cfg.validation_file)
        return TextFile(cfg.train_file), TextList(read_texts(cfg.validation_file, cfg.text_column))
    train, validation = load_texts(cfg)
    return TextList(train), TextList(validation)


def first_texts(source, n: int) -> list:
    """The first `n` texts of a source that hold more than whitespace; of conversations, the first `n` prompts
    (ChatPrompt)."""
    if isinstance(source, Conversations):
        prompts = []
        for messages in source.conversations:
            turns = []
            for m in messages:
                if m["role"] == "assistant":
                    break
                turns.append({"role": m["role"], "content": m["content"]})
            if turns and len(turns) < len(messages):
                prompts.append(ChatPrompt(tuple(turns), source.template_file))
        return prompts[:n]
    if isinstance(source, TextList):
        return [t for t in source.texts if t.strip()][:n]
    found, (start, end) = [], source.byte_range()
    with open(source.path, "rb") as f:
        f.seek(start)
        while len(found) < n and (at := f.tell()) < end:
            line = f.readline().decode("utf-8-sig" if at == 0 else "utf-8", "replace")
            if line.strip():
                found.append(line)
    return found


def load_texts(cfg) -> tuple[list[str], list[str]]:
    """(train, validation) texts from --train-file/--validation-file, a Hub dataset, or the embedded corpus."""
    if cfg.data_source == "files":
        train = read_texts(cfg.train_file, cfg.text_column)
        if cfg.validation_file:
            return train, read_texts(cfg.validation_file, cfg.text_column)
        return hold_out(train, cfg.validation_split_percentage)
    if cfg.data_source == "hub":
        return load_hub_texts(cfg.dataset, cfg.dataset_config, cfg.text_column, cfg.validation_split_percentage)
    return python_docs_texts()

"""Conversations: reading chat rows, rendering them with a chat template, and which tokens carry the loss.

Importable without torch: the tokenizer is passed in. A conversation is a list of messages
[{"role": ..., "content": ...}, ...]; a prompt/completion row becomes one, its completion turns marked.
"""

from __future__ import annotations

import hashlib
import itertools
import re

from lm.errors import UsageError

LOSS_RULES = ("assistant", "completion", "all")
EMBEDDED_CHATS = "python-docs-chat"

COMPLETION = "_completion"  # marks a prompt/completion row's completion turns; stripped before rendering
# transformers' own test for a template that marks the assistant's output (utils/chat_template_utils.py)
_GENERATION = re.compile(r"\{\%-?\s*generation\s*-?\%\}")
# Bump when the rule below changes which tokens carry loss: cached masks made by the old rule are then not reused.
_MASK_RULE_VERSION = 1


# ---------------------------------------------------------------- reading rows

def conversation_format(rows: list[dict]) -> str | None:
    """"messages", "prompt-completion", or None when the rows are not conversations (plain text)."""
    first = rows[0] if rows and isinstance(rows[0], dict) else {}
    if "messages" in first:
        return "messages"
    if "prompt" in first and "completion" in first:
        return "prompt-completion"
    return None


def read_conversations(rows: list[dict], where: str) -> tuple[list[list[dict]], str]:
    """The rows as validated conversations and their format; a malformed row is a UsageError naming `where` and it."""
    kind = conversation_format(rows)
    if kind is None:
        raise UsageError(f"{where}: the records have neither a 'messages' column nor 'prompt' and 'completion'")
    conversations = []
    for n, row in enumerate(rows, 1):
        try:
            conversations.append(_conversation(row, kind))
        except ValueError as e:
            raise UsageError(f"{where} row {n}: {e}") from None
    return conversations, kind


def _conversation(row, kind: str) -> list[dict]:
    """One row as messages; a ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"the record is a {type(row).__name__}, not an object")
    if kind == "messages":
        if "messages" not in row:
            raise ValueError("no 'messages' (the first record has them)")
        messages = _messages(row["messages"], "messages")
    else:
        for key in ("prompt", "completion"):
            if key not in row:
                raise ValueError(f"no {key!r} (the first record has 'prompt' and 'completion')")
        prompt = _turns(row["prompt"], "prompt", "user")
        completion = [{**m, COMPLETION: True} for m in _turns(row["completion"], "completion", "assistant")]
        messages = prompt + completion
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn: nothing to learn")
    if messages[0]["role"] == "assistant":
        # a template renders no prompt before it (most refuse an empty conversation), so there is no answer span
        raise ValueError("the conversation opens with the assistant's turn; give it a user or system turn first")
    return messages


def _turns(value, column: str, role: str) -> list[dict]:
    """A prompt or completion: a string is one turn of `role`, a list is messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, column)


def _messages(value, column: str) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError(f"{column!r} is a list of messages, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{column!r} is empty")
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise ValueError(f"{column!r} message {i} is not an object with 'role' and 'content'")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"{column!r} message {i} has no role")
        if not isinstance(m.get("content"), str):
            got = "none" if m.get("content") is None else f"a {type(m['content']).__name__}"
            raise ValueError(f"{column!r} message {i} ({m['role']}) has {got} for content, not a string")
    return [dict(m) for m in value]


# ---------------------------------------------------------------- the template

def load_template(tokenizer, template_file: str | None) -> str:
    """The chat template: the file's text if given, else the tokenizer's own."""
    if template_file:
        try:
            with open(template_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"--chat-template {template_file}: cannot be read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--chat-template {template_file}: not UTF-8 text (byte {e.start})") from None
        if not text.strip():
            raise UsageError(f"--chat-template {template_file}: the file is empty")
        return text
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default")
    if not template:
        raise UsageError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template to render "
                         "conversations; pass --chat-template FILE (a Jinja template)")
    return template


def has_generation_markers(template: str) -> bool:
    """Whether the template marks the assistant's output with {% generation %}."""
    return bool(_GENERATION.search(template))


def template_identity(template: str, loss_on: str) -> str:
    """A short digest of the template, the loss rule and the mask rule's version: part of the token cache key."""
    key = f"{_MASK_RULE_VERSION}\0{loss_on}\0{template}".encode()
    return hashlib.sha256(key).hexdigest()[:16]


# ---------------------------------------------------------------- which tokens learn

def encode_conversation(messages: list[dict], tokenizer, template: str, loss_on: str) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): 1 on the tokens that carry loss under `loss_on`."""
    from jinja2.exceptions import TemplateError

    if loss_on not in LOSS_RULES:
        raise ValueError(f"loss_on is one of {LOSS_RULES}, not {loss_on!r}")
    chat = [{k: v for k, v in m.items() if k != COMPLETION} for m in messages]
    try:
        return _encode(messages, chat, tokenizer, template, loss_on)
    except TemplateError as e:  # the template's raise_exception: "Conversation roles must alternate ..."
        roles = ", ".join(m["role"] for m in chat)
        raise UsageError(f"the chat template can't render a conversation ({roles}): {e}") from None


def _encode(messages, chat, tokenizer, template: str, loss_on: str) -> tuple[list[int], list[int]]:
    if loss_on == "assistant" and has_generation_markers(template):
        out = tokenizer.apply_chat_template(chat, chat_template=template, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    text = _render(tokenizer, template, chat)
    # The same call apply_chat_template makes, so the ids are those of the markers path
    encoding = tokenizer(text, add_special_tokens=False)
    ids = list(encoding["input_ids"])
    if loss_on == "all":
        return ids, [1] * len(ids)
    if loss_on == "completion":
        spans = [_completion_span(tokenizer, template, messages, chat, text)]
    else:
        _check_prefix_preserving(tokenizer, template, chat)
        spans = _assistant_spans(tokenizer, template, chat, text)
    return ids, _token_mask(_offsets(encoding), spans)


def _render(tokenizer, template: str, chat: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer, template: str, chat: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant's turns, found by rendering growing prefixes of the conversation.

    A turn's span runs from the end of the conversation before it, rendered with the generation prompt (the
    header a model is given at inference), to the end of the conversation through it: so it holds what the
    template puts after the answer to end the turn (<|im_end|>, <|eot_id|>), and the model learns to stop.
    Characters, not token ids, are diffed: a prefix tokenized alone can merge differently at the cut.
    """
    spans = []
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, template, chat[:i], generation_prompt=True)
        through = _render(tokenizer, template, chat[:i + 1])
        if not (through.startswith(prompt) and text.startswith(through)):
            raise _not_prefix_preserving()
        spans.append((len(prompt), len(through)))
    return spans


def _completion_span(tokenizer, template: str, messages: list[dict], chat: list[dict], text: str) -> tuple[int, int]:
    """The character span of a prompt/completion row's completion: what the full render adds to the prompt's."""
    first = next((i for i, m in enumerate(messages) if m.get(COMPLETION)), None)
    if first is None:
        raise UsageError("--loss-on completion needs prompt/completion records; "
                         "these are 'messages' conversations: use --loss-on assistant")
    prompt = _render(tokenizer, template, chat[:first], generation_prompt=chat[first]["role"] == "assistant")
    if not text.startswith(prompt):
        raise _not_prefix_preserving()
    return len(prompt), len(text)


_PREFIX_PRESERVING: dict[tuple, bool] = {}  # (template, special tokens) -> the check's verdict, made once


def _check_prefix_preserving(tokenizer, template: str, chat: list[dict]) -> None:
    """Refuse a template whose rendering of earlier turns changes when later turns follow (Qwen3's drops <think>).

    Each conversation is also checked as it is diffed; this check on a two-exchange conversation refuses such a
    template up front, whether or not the first conversations have two exchanges. The probe opens with `chat`'s
    system turns, as a template may require one; one the template can't render at all decides nothing.
    """
    from jinja2.exceptions import TemplateError

    key = (template, tuple(sorted(map(str, tokenizer.special_tokens_map.items()))))
    if key not in _PREFIX_PRESERVING:
        system = list(itertools.takewhile(lambda m: m["role"] == "system", chat))
        dummy = system + [{"role": "user", "content": "Question one?"}, {"role": "assistant", "content": "Answer one."},
                          {"role": "user", "content": "Question two?"}, {"role": "assistant", "content": "Answer two."}]
        try:
            text = _render(tokenizer, template, dummy)
            _assistant_spans(tokenizer, template, dummy, text)
            _PREFIX_PRESERVING[key] = True
        except UsageError:
            _PREFIX_PRESERVING[key] = False
        except TemplateError:  # the data's own conversations are rendered and checked one by one
            _PREFIX_PRESERVING[key] = True
    if not _PREFIX_PRESERVING[key]:
        raise _not_prefix_preserving()


def _not_prefix_preserving() -> UsageError:
    return UsageError("the chat template is not prefix-preserving (later turns change how earlier ones render) "
                      "and has no {% generation %} markers, so the assistant's tokens can't be found; "
                      "supply a template with --chat-template FILE")


def _offsets(encoding) -> list[tuple[int, int]]:
    encodings = getattr(encoding, "encodings", None)
    if not encodings:
        raise UsageError("masking a conversation's tokens needs a fast tokenizer (one with character offsets)")
    return encodings[0].offsets


def _token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token that overlaps a character span: transformers' rule for {% generation %} spans."""
    mask = [0] * len(offsets)
    s = 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[t] = 1
    return mask


# ---------------------------------------------------------------- the embedded conversations

# Modules whose public functions answer "What does `module.name` do?" from their docstrings
# (classes too: `itertools.chain`, `collections.Counter`)
_DOC_MODULES = ("math", "os.path", "itertools", "functools", "collections", "json", "re", "random", "statistics",
                "textwrap", "shutil", "heapq", "bisect", "string", "operator", "copy", "fnmatch", "glob")
# Their methods: "What does the `str.split` method do?" (not bytes': near copies of str's, a leak across the split)
_DOC_TYPES = (str, list, dict, set, int, float)
_ANSWER_CHARS = 600  # one answer's budget: a two-exchange conversation stays within ~400 SmolLM2 tokens
_VALIDATION_EVERY = 10  # a name whose digest is 0 mod this is validation: by name, so no answer leaks across


def python_docs_conversations() -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, validation) questions about Python answered from its own documentation, split by name."""
    train, validation = [], []
    seen_answers = set()
    for name, conversation in _docs_conversations():
        answer = conversation[1]["content"]
        if answer in seen_answers:  # aliases share a docstring ('if' and 'else' share a topic): keep the first
            continue
        seen_answers.add(answer)
        digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
        (validation if digest % _VALIDATION_EVERY == 0 else train).append(conversation)
    return train, validation


def _docs_conversations():
    """(name, conversation) pairs in a fixed order: reference-manual topics, built-ins, modules, methods."""
    import builtins
    import importlib
    import inspect

    from pydoc_data.topics import topics

    for name in sorted(topics):
        title, _, body = topics[name].partition("\n")
        statement = re.fullmatch(r'The "(\w+)" statement', title.strip())
        title = title.strip()
        if not any(c.isupper() for c in title[1:]):  # "Comparisons" -> "comparisons"; "Code Objects" stays
            title = title[0].lower() + title[1:]
        question = f"What does the `{statement[1]}` statement do?" if statement else f"Explain {title} in Python."
        body = body.lstrip("*\n")
        if conversation := _conversation_from(question, body, follow_up=True):
            yield f"topic:{name}", conversation
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if not name.startswith("_") and (inspect.isbuiltin(obj) or inspect.isfunction(obj)):
            if conversation := _conversation_from(f"What does the built-in function `{name}` do?", _doc(obj)):
                yield f"builtins.{name}", conversation
    for module_name in _DOC_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, name, None)
            own_class = inspect.isclass(obj) and obj.__module__ == module.__name__
            # random's functions are methods of a hidden Random instance
            if name.startswith("_") or not (inspect.isroutine(obj) or own_class):
                continue
            if conversation := _conversation_from(f"What does `{module_name}.{name}` do?", _doc(obj)):
                yield f"{module_name}.{name}", conversation
    for cls in _DOC_TYPES:
        for name in sorted(vars(cls)):
            if name.startswith("_") or not callable(getattr(cls, name)):
                continue
            question = f"What does the `{cls.__name__}.{name}` method do?"
            if conversation := _conversation_from(question, _doc(getattr(cls, name))):
                yield f"{cls.__name__}.{name}", conversation


def _doc(obj) -> str:
    """The object's own docstring (inspect.getdoc would give a class its base's: UserDict's is MutableMapping's)."""
    import inspect

    return inspect.cleandoc(obj.__doc__) if isinstance(obj.__doc__, str) else ""


def _conversation_from(question: str, text: str, follow_up: bool = False) -> list[dict] | None:
    """A question answered by the text's first paragraphs; with `follow_up`, "Tell me more." and the next ones."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    answer, rest = _take(paragraphs)
    if len(answer) < 40:  # "Return self==value." teaches nothing
        return None
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if follow_up and rest:
        more, _ = _take(rest)
        if more:
            conversation += [{"role": "user", "content": "Tell me more."}, {"role": "assistant", "content": more}]
    return conversation


def _take(paragraphs: list[str]) -> tuple[str, list[str]]:
    """The leading paragraphs that fit the answer budget (a long first one cut at a sentence), and the rest."""
    taken, size = [], 0
    for i, p in enumerate(paragraphs):
        if size + len(p) > _ANSWER_CHARS:
            if not taken:  # the first paragraph alone is too long: cut it after its last full sentence that fits
                cut = p.rfind(". ", 0, _ANSWER_CHARS)
                return (p[:cut + 1] if cut > 0 else ""), paragraphs[i + 1:]
            return "\n\n".join(taken), paragraphs[i:]
        taken.append(p)
        size += len(p) + 2
    return "\n\n".join(taken), []

"""The tokenizer of a GGUF file, as llama.cpp rebuilds it (lm/gguf.py writes the rest): a byte-level BPE tokenizer
(GPT-2, SmolLM2, Llama 3, Qwen) with its merges and the name of its pre-tokenization, or a SentencePiece-style one
(Llama 2, TinyLlama) with a score per piece; the token types, special ids and chat template either way. llama.cpp
must split text into the ids the model was trained on: a tokenizer it would split otherwise is refused.
"""

from __future__ import annotations

import json

from lm.errors import UsageError

SENTENCEPIECE = "default"  # tokenizer.ggml.pre of a SentencePiece-style vocabulary, as llama.cpp's converter writes

# The pre-tokenizations llama.cpp implements, by the name it reads from tokenizer.ggml.pre, as a tokenizer.json
# writes them. A tokenizer that matches none is refused: a wrong name gives other token ids, silently.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "use_regex": use_regex}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS = {  # name -> (pre-tokenizer steps, BPE ignore_merges as llama.cpp applies it)
    "gpt-2": ([_byte_level(True)], False),  # GPT-2's own regex, inside ByteLevel
    "smollm": ([{"type": "Digits", "individual_digits": True}, _byte_level(True)], False),
    "llama-bpe": ([_split(_LLAMA3_SPLIT), _byte_level(False)], True),
    "qwen2": ([_split(_QWEN2_SPLIT), _byte_level(False)], False),
}
_STEP_KEYS = {"ByteLevel": ("add_prefix_space", "use_regex"), "Digits": ("individual_digits",),
              "Split": ("pattern", "behavior", "invert")}


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (tokenizer.ggml.pre); a UsageError for one it lacks.
    A SentencePiece-style tokenizer is checked whole here (its merges included): llama.cpp names it "default"."""
    spec = backend_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UsageError(f"the tokenizer is {model.get('type')}: GGUF export writes BPE tokenizers, byte-level (GPT-2, "
                         "SmolLM2, Llama 3, Qwen2, Qwen3) or SentencePiece-style (Llama 2, TinyLlama)")
    if model.get("byte_fallback"):
        sentencepiece_scores(spec)
        return SENTENCEPIECE
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    found = [{k: step.get(k) for k in ("type", *_STEP_KEYS.get(step.get("type"), ()))} for step in steps]
    normalizer = (spec.get("normalizer") or {}).get("type")
    for name, (expected, ignore_merges) in PRE_TOKENIZERS.items():
        # Qwen2's tokenizer NFC-normalizes first; llama.cpp's qwen2 reads the same text without it, as its
        # converter names that tokenizer
        if (found == expected and bool(model.get("ignore_merges")) == ignore_merges
                and normalizer in ((None, "NFC") if name == "qwen2" else (None,))):
            return name
    raise UsageError(f"the tokenizer's pre-tokenization ({json.dumps(pre)[:200]}, normalizer {normalizer}) is not one "
                     f"llama.cpp is known to reproduce ({', '.join(PRE_TOKENIZERS)}): a GGUF would tokenize text "
                     "differently")


# --- SentencePiece-style vocabularies (Llama 2, TinyLlama: BPE over "▁"-spelled text, bytes as <0xNN> tokens) ------

def _steps(part: dict | None) -> list[dict]:
    if not part:
        return []
    return part.get("normalizers") or part.get("pretokenizers") or ([] if part["type"] == "Sequence" else [part])


def space_prefix(spec: dict) -> tuple[bool, str | None]:
    """(whether a "▁" starts the text, where this tokenizer and llama.cpp split text apart) for a SentencePiece-style
    tokenizer.json; a UsageError for a text preparation llama.cpp doesn't do. llama.cpp, as SentencePiece, writes
    spaces as "▁" and with add_space_prefix puts one more at the start and after every special token: so does a
    tokenizer.json's normalizer that prepends "▁" (it runs on each stretch between special tokens), where transformers'
    Metaspace prepends none to a text that starts with a space, and with prepend_scheme "first" none after a special
    token either."""
    normalizers, pre = _steps(spec.get("normalizer")), _steps(spec.get("pre_tokenizer"))
    spaces = {"type": "Replace", "prepend": None, "pattern": {"String": " "}, "content": "▁"}
    prepend = {"type": "Prepend", "prepend": "▁", "pattern": None, "content": None}
    legacy = [{k: step.get(k) for k in spaces} for step in normalizers]
    if not pre and legacy in ([spaces], [prepend, spaces]):
        return len(legacy) == 2, None
    if not normalizers and len(pre) == 1 and pre[0]["type"] == "Metaspace" and pre[0].get("replacement") == "▁" \
            and not pre[0].get("split"):
        scheme = pre[0].get("prepend_scheme", "always")
        if scheme == "never":
            return False, None
        return True, ("llama.cpp tokenizes a text that starts with a space with one more \"▁\" than this tokenizer "
                      "does" + (", and the text after each special token (a chat template's) with a leading \"▁\" "
                                "this tokenizer leaves out" if scheme == "first" else ""))
    raise UsageError(f"the tokenizer's text preparation (normalizer {json.dumps(spec.get('normalizer'))[:120]}, "
                     f"pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]}) is not the SentencePiece one "
                     "llama.cpp reproduces (spaces as \"▁\", no other change, no split into words)")


def sentencepiece_scores(spec: dict) -> dict[str, float]:
    """Each piece's score, as llama.cpp's SentencePiece tokenizer reads it: it joins the adjacent pair whose joined
    piece scores highest, where transformers' BPE applies the first merge in its list. Minus the rank of the first
    merge making a piece gives the same choices when every pair of pieces that joins into a piece is a merge (llama.cpp
    tries them all) and the merges come grouped by the piece they make: a tokenizer converted from a SentencePiece
    model is so; any other is refused, since llama.cpp would split text otherwise."""
    space_prefix(spec)
    vocab, merges = spec["model"]["vocab"], _merge_pairs(spec["model"].get("merges") or [])
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        piece = a + b
        if piece not in vocab:
            raise UsageError(f"the tokenizer merges {a!r} and {b!r} into {piece!r}, which is not in its vocabulary")
        rank.setdefault(piece, r)
    pairs, added = set(merges), {token["content"] for token in spec.get("added_tokens", [])}
    for piece in vocab.keys() - added:
        for i in range(1, len(piece)):
            if piece[:i] in vocab and piece[i:] in vocab and (piece[:i], piece[i:]) not in pairs:
                raise UsageError(f"the tokenizer never joins {piece[:i]!r} and {piece[i:]!r} into {piece!r}, which "
                                 "llama.cpp would: it would split text otherwise")
    return {piece: -float(r) for piece, r in rank.items()}


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """tokenizer.json's merges, written either "a b" or [a, b], as pairs."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError("the tokenizer has no tokenizer.json (a slow, Python-only tokenizer): GGUF export reads the "
                         "fast tokenizer's vocabulary and merges")
    return json.loads(backend.to_str())


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> str | None:
    """The tokenizer as llama.cpp rebuilds it: its tokens and their types, then for byte-level BPE ('gpt2') the merges
    and the pre-tokenizer's name, for a SentencePiece-style one ('llama') each piece's score and the leading space;
    special ids, whether BOS/EOS are added, and the chat template. Returns where llama.cpp will still split text
    otherwise than the tokenizer (space_prefix), or None."""
    import gguf

    spec = backend_json(tokenizer)
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    kinds = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if pre == SENTENCEPIECE:
        for i, token in by_id.items():
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                kinds[i] = gguf.TokenType.BYTE  # byte fallback: llama.cpp spells an unknown character's bytes so
        if tokenizer.unk_token_id is not None:
            kinds[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    if max(by_id) >= vocab_size:
        raise UsageError(f"the tokenizer has token ids up to {max(by_id)}, the model's vocabulary {vocab_size} rows")
    # rows of the embedding that no token uses (a vocabulary padded to a multiple of 64, say) get placeholders
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if pre == SENTENCEPIECE:
        writer.add_tokenizer_model("llama")
        scores = sentencepiece_scores(spec)
        # pieces no merge makes (characters, bytes, special tokens) are never a pair's join: any score below the rest
        writer.add_token_scores([scores.get(token, -float(len(scores) + 1)) for token in tokens])
        prefix, differs = space_prefix(spec)
        writer.add_add_space_prefix(prefix)
    else:
        differs = None
        writer.add_tokenizer_model("gpt2")
        # a space inside a part of a merge is written as the byte-level alphabet spells it (U+0120)
        writer.add_token_merges([" ".join(part.replace(" ", "\u0120") for part in pair)
                                 for pair in _merge_pairs(spec["model"].get("merges") or [])])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # what the tokenizer does, not what its config says: encode a word and look at the ends
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and len(ids) > 1 and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)
    return differs

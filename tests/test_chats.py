"""Conversations: reading rows, the chat template, which tokens carry the loss, the embedded set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lm import chats
from lm.errors import UsageError

FIXTURES = Path(__file__).parent / "fixtures"
CHAT = [{"role": "user", "content": "What does `abs` do?"},
        {"role": "assistant", "content": "It returns the absolute value of a number."},
        {"role": "user", "content": "And `round`?"},
        {"role": "assistant", "content": "It rounds a number to a given precision."}]


def trl_template(name: str) -> str:
    """One of the chat templates TRL ships (the originals and its `*_training` copies with generation markers)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / name).read_text()


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """SmolLM2's tokenizer with Llama 3's control tokens added as special tokens: for Llama 3's own templates."""
    from lm import embedded
    from lm.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(embedded.model_dir(embedded.SMOLLM2)), {})
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    return tokenizer


def learned(tokenizer, ids, mask) -> list[str]:
    """The text of each run of tokens that carry loss."""
    runs, run = [], []
    for token, m in zip(ids, mask):
        if m:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs + ([tokenizer.decode(run)] if run else [])


# ---------------------------------------------------------------- reading rows

def test_conversation_format_is_recognised_from_the_columns():
    assert chats.conversation_format([{"messages": CHAT}]) == "messages"
    assert chats.conversation_format([{"prompt": "a", "completion": "b"}]) == "prompt-completion"
    assert chats.conversation_format([{"text": "plain"}]) is None
    assert chats.conversation_format([{"prompt": "a"}]) is None


def test_prompt_completion_rows_become_conversations_with_the_completion_marked():
    rows = [{"prompt": "Q?", "completion": "A."},
            {"prompt": CHAT[:3], "completion": [CHAT[3]]}]
    conversations, kind = chats.read_conversations(rows, "pc.jsonl")
    assert kind == "prompt-completion"
    assert conversations[0] == [{"role": "user", "content": "Q?"},
                                {"role": "assistant", "content": "A.", chats.COMPLETION: True}]
    assert [m.get(chats.COMPLETION, False) for m in conversations[1]] == [False, False, False, True]


MALFORMED = {
    "missing role": {"messages": [{"content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "empty conversation": {"messages": []},
    "non-string content": {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
    "no assistant turn": {"messages": [{"role": "user", "content": "hi"}]},
    "assistant first": {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]},
    "not a list": {"messages": "hi"},
    "no messages column": {"text": "hi"},
    "not an object": ["hi"],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_row_is_one_line_naming_the_file_and_row(case):
    rows = [{"messages": CHAT}, MALFORMED[case], {"messages": CHAT}]
    with pytest.raises(UsageError) as e:
        chats.read_conversations(rows, "chats.jsonl")
    message = str(e.value)
    assert message.startswith("chats.jsonl row 2: ") and "\n" not in message, message


@pytest.mark.parametrize("row", [{"prompt": "Q?"}, {"prompt": [], "completion": "A."},
                                 {"prompt": "Q?", "completion": 3},
                                 {"prompt": "Q?", "completion": [{"role": "user", "content": "more"}]}])
def test_a_malformed_prompt_completion_row_names_the_file_and_row(row):
    with pytest.raises(UsageError, match=r"^pc\.json row 3: "):
        chats.read_conversations([{"prompt": "a", "completion": "b"}] * 2 + [row], "pc.json")


# ---------------------------------------------------------------- the template

def test_the_template_is_the_file_given_else_the_tokenizers_else_an_error(smollm2_tokenizer, tokenizer, tmp_path):
    assert chats.load_template(smollm2_tokenizer, None) == smollm2_tokenizer.chat_template
    path = tmp_path / "t.jinja"
    path.write_text(trl_template("llama3.jinja"))
    assert chats.load_template(tokenizer, str(path)) == trl_template("llama3.jinja")
    with pytest.raises(UsageError, match="--chat-template FILE") as e:
        chats.load_template(tokenizer, None)  # MiniLM's tokenizer (BERT's) has no chat template
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match=r"^--chat-template .*missing\.jinja: cannot be read \(No such file"):
        chats.load_template(tokenizer, str(tmp_path / "missing.jinja"))


# ---------------------------------------------------------------- which tokens learn

def test_without_markers_the_answers_and_their_end_of_turn_learn(smollm2_tokenizer):
    template = chats.load_template(smollm2_tokenizer, None)
    assert not chats.has_generation_markers(template)
    # transformers alone finds no assistant token in SmolLM2's template: the gap this module fills
    out = smollm2_tokenizer.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(out["assistant_masks"]) == 0

    ids, mask = chats.encode_conversation(CHAT, smollm2_tokenizer, template, "assistant")
    assert ids == out["input_ids"]
    assert learned(smollm2_tokenizer, ids, mask) == [CHAT[1]["content"] + "<|im_end|>\n",
                                                    CHAT[3]["content"] + "<|im_end|>\n"]
    # the default system turn the template inserts, and the headers, carry none
    system = smollm2_tokenizer.apply_chat_template(CHAT[:1], tokenize=False).split("<|im_start|>user")[0]
    assert system.startswith("<|im_start|>system") and system not in "".join(learned(smollm2_tokenizer, ids, mask))
    eos = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [m for token, m in zip(ids, mask) if token == eos] == [0, 0, 1, 0, 1]  # system, user, answer, user, answer


@pytest.mark.parametrize("pair", [("smollm2", "chatml_generation.jinja"), ("llama3.jinja", "llama3_training.jinja")])
def test_markers_and_prefix_diffing_give_the_same_mask(pair, smollm2_tokenizer, llama3_tokenizer):
    plain_name, marked_name = pair
    if plain_name == "smollm2":
        tok, plain, marked = smollm2_tokenizer, smollm2_tokenizer.chat_template, (FIXTURES / marked_name).read_text()
    else:
        tok, plain, marked = llama3_tokenizer, trl_template(plain_name), trl_template(marked_name)
    assert chats.has_generation_markers(marked) and not chats.has_generation_markers(plain)
    conversation = [{"role": "system", "content": "Be brief."}, *CHAT]
    by_markers = chats.encode_conversation(conversation, tok, marked, "assistant")
    by_diffing = chats.encode_conversation(conversation, tok, plain, "assistant")
    assert by_markers == by_diffing
    assert by_markers[1] == tok.apply_chat_template(conversation, chat_template=marked, return_dict=True,
                                                    return_assistant_tokens_mask=True)["assistant_masks"]
    assert sum(by_markers[1]) > 0


def test_a_trl_training_template_masks_its_generation_span(smollm2_tokenizer):
    template = trl_template("qwen2_5_training.jinja")  # ChatML: SmolLM2's vocabulary has its control tokens
    ids, mask = chats.encode_conversation(CHAT, smollm2_tokenizer, template, "assistant")
    # Qwen 2.5's training copy puts the newline after "assistant" inside the span: the markers decide, not us
    assert learned(smollm2_tokenizer, ids, mask) == ["\n" + CHAT[1]["content"] + "<|im_end|>\n",
                                                    "\n" + CHAT[3]["content"] + "<|im_end|>\n"]


def test_llama3_template_learns_the_answers_and_eot(llama3_tokenizer):
    ids, mask = chats.encode_conversation(CHAT, llama3_tokenizer, trl_template("llama3.jinja"), "assistant")
    assert ids[0] == llama3_tokenizer.bos_token_id
    assert learned(llama3_tokenizer, ids, mask) == [CHAT[1]["content"] + "<|eot_id|>",
                                                   CHAT[3]["content"] + "<|eot_id|>"]


@pytest.mark.parametrize("turns", [2, 4])
def test_a_template_that_is_not_prefix_preserving_is_refused(turns, smollm2_tokenizer):
    # Qwen3's drops the <think> block from assistant turns before the last user turn
    with pytest.raises(UsageError, match="--chat-template FILE") as e:
        chats.encode_conversation(CHAT[:turns], smollm2_tokenizer, trl_template("qwen3.jinja"), "assistant")
    assert "prefix-preserving" in str(e.value) and "\n" not in str(e.value)
    # its training copy has markers (and keeps earlier turns as they were): accepted
    ids, mask = chats.encode_conversation(CHAT[:turns], smollm2_tokenizer, trl_template("qwen3_training.jinja"),
                                          "assistant")
    assert len(learned(smollm2_tokenizer, ids, mask)) == turns // 2


def test_a_template_that_requires_a_system_turn_masks_conversations_that_have_one(smollm2_tokenizer):
    # the up-front prefix check renders a conversation of its own: it opens with the data's system turn too
    template = ("{%- if messages[0]['role'] != 'system' %}{{ raise_exception('The first message must be a system "
                "message') }}{%- endif %}" + smollm2_tokenizer.chat_template)
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    ids, mask = chats.encode_conversation(chat, smollm2_tokenizer, template, "assistant")
    assert learned(smollm2_tokenizer, ids, mask) == [CHAT[1]["content"] + "<|im_end|>\n",
                                                   CHAT[3]["content"] + "<|im_end|>\n"]
    with pytest.raises(UsageError, match=r"can't render a conversation \(user, assistant.*must be a system"):
        chats.encode_conversation(CHAT, smollm2_tokenizer, template, "assistant")
    # a template for single exchanges can't render the probe at all: its conversations are checked one by one
    single = ("{%- if messages | length > 2 %}{{ raise_exception('One question, one answer') }}{%- endif %}"
              + smollm2_tokenizer.chat_template)
    ids, mask = chats.encode_conversation(CHAT[:2], smollm2_tokenizer, single, "assistant")
    assert learned(smollm2_tokenizer, ids, mask) == [CHAT[1]["content"] + "<|im_end|>\n"]


def test_a_conversation_the_template_rejects_is_one_line(smollm2_tokenizer):
    template = trl_template("gemma.jinja")  # Gemma's raises for a system turn
    with pytest.raises(UsageError, match=r"can't render a conversation \(system, user, assistant.*System role not"):
        chats.encode_conversation([{"role": "system", "content": "Be brief."}, *CHAT], smollm2_tokenizer, template,
                                  "assistant")
    ids, mask = chats.encode_conversation(CHAT, smollm2_tokenizer, template, "assistant")
    assert learned(smollm2_tokenizer, ids, mask)[0] == CHAT[1]["content"] + "<end_of_turn>\n"


def test_loss_on_all_and_completion(smollm2_tokenizer):
    template = smollm2_tokenizer.chat_template
    (conversation,), _ = chats.read_conversations([{"prompt": CHAT[:3], "completion": [CHAT[3]]}], "pc.jsonl")
    ids, every = chats.encode_conversation(conversation, smollm2_tokenizer, template, "all")
    assert every == [1] * len(ids) and ids == smollm2_tokenizer.apply_chat_template(CHAT)["input_ids"]
    assert learned(smollm2_tokenizer, *chats.encode_conversation(conversation, smollm2_tokenizer, template,
                                                                 "completion")) == [CHAT[3]["content"] + "<|im_end|>\n"]
    # the rule "assistant" also learns the prompt's earlier answer
    assert len(learned(smollm2_tokenizer, *chats.encode_conversation(conversation, smollm2_tokenizer, template,
                                                                     "assistant"))) == 2
    with pytest.raises(UsageError, match="--loss-on completion needs prompt/completion"):
        chats.encode_conversation(CHAT, smollm2_tokenizer, template, "completion")


def test_template_identity_changes_with_the_template_and_the_rule():
    a = chats.template_identity("T", "assistant")
    assert a == chats.template_identity("T", "assistant")
    assert len({a, chats.template_identity("T2", "assistant"), chats.template_identity("T", "all")}) == 3


# ---------------------------------------------------------------- the embedded conversations

def test_python_docs_conversations_are_valid_deterministic_and_split_by_name(smollm2_tokenizer):
    train, validation = chats.python_docs_conversations()
    assert (train, validation) == chats.python_docs_conversations()
    assert 200 <= len(train) and 20 <= len(validation) <= len(train) // 5
    for part in (train, validation):
        chats.read_conversations([{"messages": c} for c in part], chats.EMBEDDED_CHATS)
    answers = [{m["content"] for c in part for m in c if m["role"] == "assistant"} for part in (train, validation)]
    questions = [{c[0]["content"] for c in part} for part in (train, validation)]
    assert not answers[0] & answers[1] and not questions[0] & questions[1]
    assert any(len(c) == 4 for c in train)  # follow-up turns: a multi-turn mask
    template = smollm2_tokenizer.chat_template
    lengths = [len(chats.encode_conversation(c, smollm2_tokenizer, template, "assistant")[0])
               for c in validation]
    assert max(lengths) <= 512, max(lengths)


def test_the_docs_example_is_what_the_code_prints(capsys):
    page = (Path(__file__).parents[1] / "docs" / "conversations.md").read_text(encoding="utf-8")
    (snippet,) = re.findall(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    exec(snippet, {})
    printed = capsys.readouterr().out
    assert printed.count("[<|im_end|>]") == 2 and f"```text\n{printed}```" in page

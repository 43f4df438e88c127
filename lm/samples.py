"""Greedy samples during training (--sample-every, causal LM): what the model writes after a few fixed prompts, the
same prompts every time, so the samples of one run (and of two runs) read side by side.
"""

from __future__ import annotations

import torch

from lm.hardware import autocast

NEW_TOKENS = 32  # tokens decoded after each prompt
PROMPTS = 3  # validation texts that become prompts when --sample-prompts names no file
PROMPT_TOKENS = 16  # of each of those texts, the first tokens


def prompt_ids(tokenizer, prompts: list, cut: bool) -> list[list[int]]:
    """The token ids of each prompt: a text's without special tokens (`cut`: only its first PROMPT_TOKENS, a prompt
    taken from a validation text), or what a prompt that renders itself gives (lm.texts.ChatPrompt: a held-out
    conversation's turns and the opening of the reply). Prompts that give no token are left out."""
    ids = [p.ids(tokenizer) if hasattr(p, "ids") else tokenizer(p, add_special_tokens=False)["input_ids"][
        :PROMPT_TOKENS if cut else None] for p in prompts]
    return [i for i in ids if i]


@torch.no_grad()
def greedy(model, prompt: list[int], device: torch.device, precision: str, context: int, eos: int | None = None,
           n: int = NEW_TOKENS) -> list[int]:
    """The `n` tokens the model finds likeliest one after another after `prompt` (fewer when it writes `eos`), each
    read off the last `context` tokens (the block size it trains on). Each token reads them again, without a
    key-value cache: n short forwards are cheap next to a training step, and any model with logits will do."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt], device=device)  # (1, T)
    no_cache = {"use_cache": False} if getattr(model.config, "use_cache", False) else {}  # it would not be read
    with autocast(device, precision):
        for _ in range(n):
            token = model(input_ids=ids[:, -context:], **no_cache).logits[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            if token == eos:
                break
    model.train(was_training)
    return ids[0, len(prompt):].tolist()


def as_markdown(samples: list[tuple[str, str]]) -> str:
    """(prompt, continuation) pairs for TensorBoard's text tab: the prompt in bold, each sample its own paragraph."""
    quote = lambda text: text.replace("\\", "\\\\").replace("*", "\\*").replace("\n", "  \n")
    return "\n\n".join(f"**{quote(prompt)}**{quote(continuation)}" for prompt, continuation in samples)

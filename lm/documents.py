"""--document-boundaries inside the model: the texts packed into one block attend only to themselves and
count their positions from their own first token.

A batch says which text each token belongs to through its (B, T) attention mask: 0 on padding, and
1, 2, ... numbering the texts of a row (lm.data.pad_batch). `attention_inputs` turns that into what
the model's attention implementation takes, so that each text computes what it would alone:

- SDPA (any device): a (B, 1, T, T) bool mask, True where a query may attend to a key;
- eager: the same as an additive float mask (eager adds the mask: a bool one would be silently wrong);
- FlexAttention: a BlockMask;
- FlashAttention 2/3 (CUDA, the flash_attn package): no mask, the varlen offsets of the texts;

plus position ids restarting at each text (RoBERTa's: padding_idx + 1 + offset, as it numbers them).
These bodies pass a 4D mask through to attention unchanged, so the mask carries causality and any
sliding window itself. Padding is a text of its own: no row of the mask is empty (NaN), no text sees it.
"""

from __future__ import annotations

import torch

from lm.errors import UsageError

CAUSAL = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
BIDIRECTIONAL = ("bert", "roberta", "xlm-roberta", "camembert")  # causal only as decoders (config.is_decoder)
PADDING_OFFSET = ("roberta", "xlm-roberta", "camembert")  # positions count from padding_idx + 1
ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_architecture(config) -> None:
    """Refuse, before any data is tokenized, a model whose body this module can't give per-text attention."""
    if config.model_type not in CAUSAL + BIDIRECTIONAL:
        raise UsageError(f"--document-boundaries supports {', '.join(CAUSAL + BIDIRECTIONAL)} models, not "
                         f"{config.model_type}; drop --document-boundaries")


def prepare_model(model, device: torch.device, precision: str) -> None:
    """Varlen FlashAttention where it runs (CUDA, bf16/fp16, flash_attn installed): no (T, T) mask at all.
    Else the model keeps its attention, which must be one of ATTENTION."""
    from transformers.utils import is_flash_attn_2_available

    if (device.type == "cuda" and precision in ("bf16", "fp16") and model.config._attn_implementation == "sdpa"
            and getattr(model, "_supports_flash_attn", False) and is_flash_attn_2_available()):
        model.set_attn_implementation("flash_attention_2")
    if model.config._attn_implementation not in ATTENTION:
        raise UsageError(f"--document-boundaries works with {', '.join(ATTENTION)} attention, not "
                         f"{model.config._attn_implementation}; load the model with attn_implementation='sdpa'")


def attention_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     texts: bool = True) -> dict:
    """Keyword arguments of `model` (or its body) for a batch: the mask as it is where no row holds two
    texts, else per-text attention and position ids. `texts` False: the mask is known to hold only 0
    and 1 (no --document-boundaries), and is passed on without a look at its values."""
    if not texts or not numbers_texts(attention_mask):
        return {"attention_mask": attention_mask}
    config, texts = model.config, attention_mask  # (B, T): 0 padding, 1, 2, ... the texts of a row
    inputs = {"position_ids": positions(config, input_ids, texts)}
    implementation = config._attn_implementation
    if implementation.startswith("flash_attention"):
        return {**inputs, "attention_mask": None, **varlen_offsets(texts)}
    causal = config.model_type in CAUSAL or bool(getattr(config, "is_decoder", False))
    window = getattr(config, "sliding_window", None)
    window = window if window and window < texts.shape[1] else None  # a window as long as the block changes nothing

    def make(window):
        if implementation == "flex_attention":
            return block_mask(texts, causal, window)
        ok = allowed(texts, causal, window)
        return additive(ok, model.dtype) if implementation == "eager" else ok

    layer_types = getattr(config, "layer_types", None) or ()
    if window is not None and "sliding_attention" in layer_types:  # Qwen: some layers slide, others see it all
        inputs["attention_mask"] = {kind: make(window if kind == "sliding_attention" else None)
                                    for kind in set(layer_types)}
    else:  # Mistral: a window on every layer when it has one
        inputs["attention_mask"] = make(window)
    return inputs


@torch.compiler.disable  # a look at the data: a compiled graph ends here, without Dynamo's warning
def numbers_texts(attention_mask: torch.Tensor | None) -> bool:
    """Whether some row of the mask holds two texts or more."""
    return attention_mask is not None and bool(attention_mask.max() > 1)


def text_starts(texts: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: where a text (or a padding run) begins."""
    new = torch.ones_like(texts, dtype=torch.bool)
    new[:, 1:] = texts[:, 1:] != texts[:, :-1]
    return new


def positions(config, input_ids: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids that restart at each text's first token, as the model numbers a text alone."""
    index = torch.arange(texts.shape[1], device=texts.device).expand_as(texts)
    first = torch.where(text_starts(texts), index, 0).cummax(dim=1).values  # where each token's text starts
    if config.model_type not in PADDING_OFFSET:
        return index - first
    # RoBERTa counts a text's non-padding tokens from padding_idx + 1; padding tokens get padding_idx
    real = (input_ids != config.pad_token_id).long()
    count = real.cumsum(1)
    return (count - (count - real).gather(1, first)) * real + config.pad_token_id


def allowed(texts: torch.Tensor, causal: bool, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: query i may attend to key j (same text; j <= i if causal; i - j < window if one)."""
    ok = texts[:, :, None] == texts[:, None, :]
    if causal or window:
        index = torch.arange(texts.shape[1], device=texts.device)
        distance = index[:, None] - index[None, :]  # (T, T) query - key
        if causal:
            ok &= distance >= 0
        if window:
            ok &= distance < window
    return ok[:, None]


def additive(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as eager attention adds it: 0 where allowed, the dtype's most negative number elsewhere."""
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(~ok, torch.finfo(dtype).min)


def block_mask(texts: torch.Tensor, causal: bool, window: int | None = None):
    """allowed() as FlexAttention's BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        ok = texts[b, q] == texts[b, k]
        if causal:
            ok = ok & (q >= k)
        if window:
            ok = ok & (q - k < window)
        return ok

    batch, length = texts.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=texts.device)


def varlen_offsets(texts: torch.Tensor) -> dict:
    """FlashAttention's varlen arguments: where each text (and padding run) starts in the flattened batch."""
    starts = text_starts(texts).reshape(-1).nonzero().view(-1)
    offsets = torch.cat([starts, starts.new_tensor([texts.numel()])]).to(torch.int32)
    longest = int(offsets.diff().max())
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}

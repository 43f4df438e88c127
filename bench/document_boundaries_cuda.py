"""--document-boundaries on a GPU: packed texts against each text alone, per attention implementation, and the
step time it costs. Needs no data, no network and no embedded model: tiny models are built from configs.

    python bench/document_boundaries_cuda.py                 # CUDA: ~1-3 min (FlexAttention compiles)
    python bench/document_boundaries_cuda.py --device cpu    # the same checks on a CPU (no flex backward there)

1. Correctness. For GPT-2, Llama, Qwen2 (a sliding window shorter than the texts on one of its two
   layers), BERT and RoBERTa, each with SDPA, eager, FlexAttention and FlashAttention 2 where the
   architecture, transformers and the installed packages offer them: 4 rows of 64 tokens, each
   packing texts of 1 to 30 tokens (a row ends in padding), through lm.losses.TokenLoss as training
   runs it (lm.documents builds the mask or the varlen offsets from the attention mask's text
   numbers), against each text run alone through the plain model (SDPA, the same weights). Prints
   the largest difference of the per-token losses, in fp32 (should be ~1e-6) and under bf16 autocast
   (~1e-3 is bf16's rounding), and as a sanity check the difference with the texts not kept apart
   (should be large, ~0.3).
2. Speed. Forward + backward of a 4-layer, 256-wide Llama and BERT at 8 x 128, fp32 and bf16: plain
   blocks against packed ones (texts of 3 to 40 tokens), per attention implementation; medians of 20
   steps after 5 warmup steps, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from lm import documents  # noqa: E402
from lm.data import IGNORE, causal_labels  # noqa: E402
from lm.losses import TokenLoss  # noqa: E402

VOCAB, PAD = 1000, 1
CAUSAL = ("gpt2", "llama", "qwen2")
KINDS = ("gpt2", "llama", "qwen2", "bert", "roberta")
ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def build(kind: str, attention: str, hidden: int = 64, layers: int = 2):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, pad_token_id=PAD)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif kind in ("llama", "qwen2"):
        config = (transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config)(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
            **(dict(use_sliding_window=True, sliding_window=6, max_window_layers=1) if kind == "qwen2" else {}))
    else:
        config = (transformers.BertConfig if kind == "bert" else transformers.RobertaConfig)(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
            max_position_embeddings=258, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    auto = transformers.AutoModelForCausalLM if kind in CAUSAL else transformers.AutoModelForMaskedLM
    return auto.from_config(config, attn_implementation=attention)


def packed(batch: int, length: int, shortest: int, longest: int, device, pad_last: bool = True):
    """(input_ids, texts): rows of random texts of shortest..longest tokens; the last row ends in padding."""
    g = torch.Generator().manual_seed(1)
    texts = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        at, number = 0, 1
        end = length - 7 if pad_last and row == batch - 1 else length
        while at < end:
            n = min(int(torch.randint(shortest, longest + 1, (1,), generator=g)), end - at)
            texts[row, at:at + n] = number
            at, number = at + n, number + 1
    ids = torch.randint(5, VOCAB, (batch, length), generator=g).masked_fill(texts == 0, PAD)
    return ids.to(device), texts.to(device)


def labels_of(kind: str, ids, texts):
    if kind in CAUSAL:
        return causal_labels(ids, texts)
    g = torch.Generator().manual_seed(2)
    return ids.masked_fill((torch.rand(ids.shape, generator=g) > 0.3).to(ids.device) | (texts == 0), IGNORE)


def per_token(model, ids, mask, labels, precision: str):
    keep = labels != IGNORE
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=precision == "bf16"):
        logits = TokenLoss(model).labelled_logits(ids, mask, keep)
    return F.cross_entropy(logits.float(), labels[keep], reduction="none")


def alone(model, ids, texts, labels, precision: str):
    logits = torch.zeros(*ids.shape, VOCAB, device=ids.device)
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=precision == "bf16"):
        for row in range(len(ids)):
            for text in texts[row].unique():
                where = texts[row] == text
                logits[row, where] = model(input_ids=ids[row, where][None]).logits[0].float()
    keep = labels != IGNORE
    return F.cross_entropy(logits[keep], labels[keep], reduction="none")


def correctness(device) -> None:
    print("max |packed - alone| per-token loss; 'apart off' = texts not kept apart (should be large)")
    ids, texts = packed(4, 64, 1, 30, device)
    for kind in KINDS:
        labels = labels_of(kind, ids, texts)
        reference = build(kind, "sdpa").to(device).eval()  # each text alone, through the plain model
        with torch.no_grad():
            expected = {precision: alone(reference, ids, texts, labels, precision) for precision in ("fp32", "bf16")}
        for attention in ATTENTION:
            try:
                model = build(kind, attention).to(device).eval()
                model.load_state_dict(reference.state_dict())
                documents.prepare_model(model, device, "fp32")
            except Exception as e:  # noqa: BLE001  (not offered for this architecture or here)
                print(f"{kind:8} {attention:18} not available: {str(e).splitlines()[0][:100]}")
                continue
            cells = []
            for precision in ("fp32", "bf16"):
                if attention.startswith("flash") and precision == "fp32":
                    continue  # FlashAttention runs in 16 bits only
                try:
                    with torch.no_grad():
                        ours = per_token(model, ids, texts, labels, precision)
                        plain = per_token(model, ids, (texts > 0).long(), labels, precision)
                    cells.append(f"{precision} {(ours - expected[precision]).abs().max().item():.1e} "
                                 f"(apart off {(plain - expected[precision]).abs().max().item():.1e})")
                except Exception as e:  # noqa: BLE001
                    cells.append(f"{precision} FAILED {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            print(f"{kind:8} {attention:18} " + " | ".join(cells), flush=True)


def step_time(model, ids, mask, labels, precision: str, device, steps: int = 20, warmup: int = 5) -> float:
    module = TokenLoss(model)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            loss = module(ids, mask, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def speed(device) -> None:
    print("\nforward + backward at 8 x 128, hidden 256, 4 layers: median ms, plain blocks -> packed texts")
    ids, texts = packed(8, 128, 3, 40, device, pad_last=False)
    for kind in ("llama", "bert"):
        labels_plain, labels_packed = labels_of(kind, ids, texts > 0), labels_of(kind, ids, texts)
        for attention in ("sdpa", "flex_attention", "flash_attention_2"):
            for precision in ("fp32", "bf16"):
                if attention.startswith("flash") and precision == "fp32":
                    continue
                try:
                    model = build(kind, attention, hidden=256, layers=4).to(device).train()
                    plain = step_time(model, ids, (texts > 0).long(), labels_plain, precision, device)
                    ours = step_time(model, ids, texts, labels_packed, precision, device)
                    print(f"{kind:6} {attention:18} {precision}: {plain * 1e3:7.2f} -> {ours * 1e3:7.2f} ms "
                          f"(x{ours / plain:.3f})", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{kind:6} {attention:18} {precision}: not available: {str(e).splitlines()[0][:100]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}, transformers {transformers.__version__}; flash_attn installed: "
          f"{transformers.utils.is_flash_attn_2_available()}")
    correctness(device)
    if not args.skip_speed:
        speed(device)


if __name__ == "__main__":
    main()

"""--document-boundaries in the model: a packed block scores each of its texts exactly as that text alone."""

import random

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import WORDS, run_script
from lm import documents
from lm.data import IGNORE, CausalCollator, Examples, blocks_of
from lm.errors import UsageError
from lm.losses import TokenLoss
from lm.masking import MaskingCollator
from lm.texts import TextList
from lm.token_cache import prepare

BLOCK = 32
WINDOW = 5  # sliding window of the Mistral and Qwen2 below: shorter than most texts, so it matters


def texts(n: int = 24, seed: int = 0) -> list[str]:
    """Lines of 1 to 14 pseudo-words: many texts per 32-token block, some across two blocks."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 14))) + ".\n" for _ in range(n)]


def tiny(kind: str, vocab: int, pad_id: int, attention: str):
    """A 2-layer model of `kind` built from a config, without dropout, in fp32."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, pad_token_id=pad_id)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif kind in ("llama", "mistral", "qwen2"):
        decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, **common)
        if kind == "mistral":
            decoder["sliding_window"] = WINDOW  # every layer slides
        if kind == "qwen2":
            decoder.update(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)  # layer 1 slides
        config = getattr(transformers, {"llama": "LlamaConfig", "mistral": "MistralConfig",
                                        "qwen2": "Qwen2Config"}[kind])(**decoder)
    else:
        encoder = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
        if kind == "bert":
            config = transformers.BertConfig(max_position_embeddings=64, **encoder)
        else:  # positions from padding_idx + 1
            config = transformers.RobertaConfig(max_position_embeddings=64 + pad_id + 1, **encoder)
    auto = transformers.AutoModelForMaskedLM if kind in ("bert", "roberta") else transformers.AutoModelForCausalLM
    return auto.from_config(config, attn_implementation=attention).float()


def packed_batch(tokenizer, tmp_path, masked: bool) -> dict:
    """The first 4 blocks of the texts through the token cache (--document-boundaries) and the task's collator,
    and a 5th cut short, so that its row ends in padding."""
    prepared = prepare(TextList(texts()), tokenizer, tmp_path, 1, documents=True, say=lambda *a, **k: None)
    blocks = Examples(blocks_of(prepared.tokens(), BLOCK, "test"), prepared.starts())
    collate = MaskingCollator(tokenizer, 0.3, seed=0, evaluation=True) if masked else CausalCollator(tokenizer)
    index, ids, numbers = blocks[4]
    batch = collate([blocks[i] for i in range(4)] + [(index, ids[:BLOCK - 7], numbers[:BLOCK - 7])])
    assert batch["attention_mask"].max() > 3  # several texts per block: what is tested
    return batch


def per_token_losses(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """The losses of the labelled positions, through TokenLoss as the loop runs it."""
    keep = labels != IGNORE
    logits = TokenLoss(model).eval().labelled_logits(input_ids, attention_mask, keep)
    return F.cross_entropy(logits.float(), labels[keep], reduction="none")


def alone_losses(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """The same positions' losses with each text of each row run on its own through the plain model."""
    logits = torch.zeros(*input_ids.shape, model.config.vocab_size)
    for row in range(len(input_ids)):
        for text in attention_mask[row].unique():
            where = attention_mask[row] == text
            logits[row, where] = model(input_ids=input_ids[row, where][None]).logits[0]
    keep = labels != IGNORE
    return F.cross_entropy(logits[keep], labels[keep], reduction="none")


CASES = [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager"), ("llama", "flex_attention"),
         ("mistral", "sdpa"), ("qwen2", "sdpa"), ("bert", "sdpa"), ("bert", "eager"), ("roberta", "sdpa")]


@pytest.mark.parametrize("kind, attention", CASES)
def test_a_packed_block_scores_each_text_as_if_it_were_alone(kind, attention, tokenizer, smollm2_tokenizer, tmp_path):
    masked = kind in ("bert", "roberta")
    # GPT-2 and Llama get SmolLM2's tokenizer, which adds no special tokens: the cache ends texts with <|im_end|>
    tok = tokenizer if masked else smollm2_tokenizer
    model = tiny(kind, len(tok), tok.pad_token_id, attention).eval()
    batch = packed_batch(tok, tmp_path, masked)
    args = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        packed, alone = per_token_losses(model, *args), alone_losses(model, *args)
        assert len(packed) > 20
        torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
        # the test can fail: the same block as one text per row (no boundaries) scores differently
        plain = per_token_losses(model, args[0], (args[1] > 0).long(), args[2])
        assert (plain - alone).abs().max() > 1e-3
    if attention == "flex_attention":
        return  # FlexAttention has no backward on CPU
    # training: the summed loss (the fused head for split models) is the alone losses' sum, and has gradients
    loss = TokenLoss(model)(*args)
    assert loss.item() == pytest.approx(alone.sum().item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_labels_never_cross_into_the_next_text(smollm2_tokenizer, tmp_path):
    batch = packed_batch(smollm2_tokenizer, tmp_path, masked=False)
    ids, texts, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    same = (texts[:, 1:] == texts[:, :-1]) & (texts[:, 1:] > 0)  # t and t + 1 in one text
    boundary = (texts[:, 1:] != texts[:, :-1]) & (texts[:, 1:] > 0)  # t ends a text, another starts at t + 1
    assert boundary.any() and (labels[:, :-1][boundary] == IGNORE).all()  # a text's last token predicts nothing
    assert (ids[:, :-1][boundary] == smollm2_tokenizer.eos_token_id).all()  # ... and is the eos the cache added
    assert torch.equal(labels[:, :-1][same], ids[:, 1:][same])  # every other token predicts the next
    assert (labels[:, :-1][~same] == IGNORE).all() and (labels[:, -1] == IGNORE).all()


def test_positions_restart_at_each_text():
    texts = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    ids = torch.tensor([[5, 6, 7, 8, 9, 1, 1, 1]])
    gpt2 = transformers.GPT2Config()
    assert documents.positions(gpt2, ids, texts).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    roberta = transformers.RobertaConfig(pad_token_id=1)  # RoBERTa skips its pad id: padding_idx + 1 on
    assert documents.positions(roberta, ids, texts).tolist() == [[2, 3, 4, 2, 3, 1, 1, 1]]


def test_varlen_offsets_are_the_ones_transformers_derives_from_positions():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    texts = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3], [1, 2, 2, 2, 2, 2, 0, 0]])
    ours = documents.varlen_offsets(texts)
    position_ids = documents.positions(transformers.GPT2Config(), texts, texts)
    (cu_q, cu_k), (longest_q, longest_k) = prepare_fa_kwargs_from_position_ids(position_ids.reshape(1, -1))
    assert ours["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 3, 5, 8, 9, 14, 16]
    assert ours["max_length_q"] == int(longest_q) == 5


def test_one_text_per_row_leaves_the_mask_as_it_is():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    model = tiny("gpt2", 50, 0, "sdpa")
    assert documents.attention_inputs(model, torch.zeros_like(mask), mask) == {"attention_mask": mask}


def test_another_architecture_is_a_one_line_error(tokenizer, corpus, tmp_path):
    with pytest.raises(UsageError, match="--document-boundaries supports gpt2, llama, .* not opt"):
        documents.check_architecture(transformers.OPTConfig())
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=1, ffn_dim=64,
        num_attention_heads=2, max_position_embeddings=64))
    model_dir = tmp_path / "opt"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    r = run_script("clm", "--model", model_dir, "--train-file", corpus, "--document-boundaries", "--output-dir",
                   tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert r.returncode == 2 and r.stderr.startswith("error: --document-boundaries supports"), r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and not (tmp_path / "cache" / "tokens").exists()  # refused before tokenizing

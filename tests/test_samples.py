"""--sample-every: greedy continuations of fixed prompts, in the log and TensorBoard's text tab."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPT2Config, GPT2LMHeadModel

from lm.config import Config, parse_args
from lm.errors import UsageError
from lm.samples import PROMPT_TOKENS, greedy
from lm.train import train


def test_greedy_is_what_generate_decodes_without_sampling():
    torch.manual_seed(1)  # large random weights: a continuation that doesn't repeat one token
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                       initializer_range=0.5))
    prompt = [3, 14, 15, 9, 2]
    ours = greedy(model.train(), prompt, torch.device("cpu"), "fp32", context=32, n=8)
    assert model.training  # decoded without dropout, then put back in training mode
    theirs = model.eval().generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                                   max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == theirs[0, 5:].tolist()
    assert len(set(ours)) > 2 and ours[3] not in ours[:3]
    assert greedy(model, prompt, torch.device("cpu"), "fp32", context=32, eos=ours[3], n=8) == ours[:4]


def text_samples(out) -> list[tuple[int, str]]:
    events = EventAccumulator(str(out / "logs"), size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("samples/text_summary")]


def settings(model_dir, corpus, out, **extra) -> Config:
    return Config.for_task("clm", model=str(model_dir), train_file=str(corpus), block_size=32, batch_size=2,
                           max_train_steps=4, precision="fp32", compile="off", output_dir=str(out), **extra)


def test_samples_of_a_prompt_file_are_logged_and_written_to_tensorboard(tiny_gpt2, corpus, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the model reads\n\npython list\n")
    train(settings(tiny_gpt2, corpus, tmp_path / "out", sample_every=2, sample_prompts=str(prompts)))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sample at step")]
    assert [line.split(": ")[0] for line in lines] == ["sample at step 2"] * 2 + ["sample at step 4"] * 2
    assert lines[0].startswith("sample at step 2: 'the model reads' -> '") and "'python list' -> '" in lines[1]
    written = text_samples(tmp_path / "out")
    assert [step for step, _ in written] == [2, 4]
    assert written[0][1].startswith("**the model reads**") and "\n\n**python list**" in written[0][1]


def test_without_a_file_the_prompts_are_the_start_of_the_first_validation_texts(tiny_gpt2, corpus, tmp_path, capsys,
                                                                                 tokenizer):
    train(settings(tiny_gpt2, corpus, tmp_path / "out", sample_every=4))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sample at step 4")]
    first = corpus.read_text().splitlines()[0]  # the hold-out split takes the first lines of the file
    ids = tokenizer(first, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
    assert len(lines) == 3 and lines[0].startswith(f"sample at step 4: {tokenizer.decode(ids)!r} -> ")


@pytest.mark.parametrize("task, argv, message", [
    ("mlm", ["--sample-every", "5"], "--sample-every is for causal LM only"),
    ("clm", ["--sample-prompts", "p.txt"], "--sample-prompts are for --sample-every N: give it too"),
    ("clm", ["--sample-every", "5", "--fsdp"], "--fsdp shards it over all of them: sample from the saved model"),
    ("clm", ["--sample-every", "0"], "--sample-every must be a positive integer"),
])
def test_sampling_settings_that_cannot_work(task, argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(task, argv)

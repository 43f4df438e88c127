import pytest

from lm.config import HF_ALIASES, HF_IGNORED, HF_REFUSED, Config, build_parser, flag, parse_args
from lm.errors import UsageError

# A value, not the default, for each field an alias sets; and the flags some of them need.
VALUES = dict(model="some/model", tokenizer="some/tokenizer", dataset="wikitext", dataset_config="wikitext-2-raw-v1", train_file="t.txt",
              validation_file="v.txt", validation_split_percentage="10", block_size="64", mlm_prob="0.2",
              max_train_samples="100", max_eval_samples="20", lr="3e-4", weight_decay="0.1",
              lr_scheduler="cosine", warmup_steps="7", grad_accum_steps="4", epochs="2", max_train_steps="50",
              batch_size="16", eval_batch_size="32", output_dir="out", save_every="5", resume_from="latest",
              preprocessing_workers="3", ddp_timeout="60")
NEEDS = dict(validation_file=["--train-file", "t.txt"], dataset_config=["--dataset", "wikitext"])


@pytest.mark.parametrize("hf, name", HF_ALIASES.items())
def test_each_alias_parses_like_our_flag(hf, name):
    value = [VALUES[name]] if name in VALUES else []  # --line-by-line takes none
    theirs = parse_args("mlm", [*NEEDS.get(name, []), f"--{hf}", *value])
    ours = parse_args("mlm", [*NEEDS.get(name, []), f"--{flag(name)}", *value])
    assert theirs == ours != Config.for_task("mlm")


@pytest.mark.parametrize("value, expected", [("True", True), ("true", True), ("1", True), ("False", False)])
def test_line_by_line_takes_the_value_hf_users_write(value, expected):
    assert parse_args("mlm", ["--line_by_line", value]).line_by_line is expected


def test_checkpointing_steps_takes_epoch_or_steps():
    by_epoch = parse_args("clm", ["--checkpointing_steps", "epoch"])
    assert (by_epoch.save_every, by_epoch.save_steps) == ("epoch", None)
    assert by_epoch == parse_args("clm", ["--save-every", "epoch"])
    by_steps = parse_args("clm", ["--checkpointing_steps", "25"])
    assert (by_steps.save_every, by_steps.save_steps) == (25, 25)
    assert parse_args("clm", []).save_steps is None


@pytest.mark.parametrize("value", ["0", "-3", "epochs", "1.5"])
def test_save_every_refuses_anything_else(value):
    with pytest.raises(UsageError, match="--save-every must be a positive integer or 'epoch'"):
        parse_args("clm", ["--checkpointing_steps", value])


@pytest.mark.parametrize("value", [0, -3, "Epoch", 2.0])
def test_config_refuses_anything_else(value):
    with pytest.raises(UsageError, match="--save-every must be a positive integer or 'epoch'"):
        Config.for_task("clm", save_every=value)


@pytest.mark.parametrize("hf", HF_IGNORED)
def test_ignored_switches_change_nothing(hf):
    assert parse_args("clm", [f"--{hf}"]) == parse_args("clm", [])


@pytest.mark.parametrize("hf, advice", HF_REFUSED.items())
@pytest.mark.parametrize("value", [[], ["x"]])
def test_unsupported_flags_name_what_to_use(hf, advice, value):
    with pytest.raises(UsageError) as e:
        parse_args("clm", ["--seed", "1", f"--{hf}", *value])
    assert str(e.value) == f"--{hf} is not supported: {advice}"


def test_examples_of_advice():
    for hf, words in [("config_name", "--model DIR"), ("use_slow_tokenizer", "--tokenizer DIR"),
                      ("push_to_hub", "huggingface-cli upload"), ("report_to", "TensorBoard")]:
        with pytest.raises(UsageError, match=words):
            parse_args("mlm", [f"--{hf}"])


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_help_lists_no_hf_spelling(task):
    text = build_parser(task).format_help()
    assert not [hf for hf in [*HF_ALIASES, *HF_IGNORED, *HF_REFUSED] if f"--{hf}" in text]


def test_prefixes_are_not_abbreviations():
    # --output would match both --output-dir and --output_dir; no flag is taken from a prefix
    with pytest.raises(UsageError, match="unrecognized arguments: --output"):
        parse_args("clm", ["--output", "x"])

import ast
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from lm.cli import main
from lm import hf_flags
from lm.config import OPTIMIZERS, Config, build_parser, flag, parse_args
from lm.hf_flags import ADAMW_NAMES, HF_ALIASES, HF_IGNORED, HF_REFUSED, TRAINER_FLAGS, TRAINER_OLD_NAMES
from lm.errors import UsageError

# A value, not the default, for each field an alias sets; and the flags some of them need.
VALUES = dict(model="some/model", tokenizer="some/tokenizer", dataset="wikitext", dataset_config="wikitext-2-raw-v1", train_file="t.txt",
              validation_file="v.txt", validation_split_percentage="10", block_size="64", mlm_prob="0.2",
              max_train_samples="100", max_eval_samples="20", lr="3e-4", weight_decay="0.1",
              lr_scheduler="cosine", warmup_steps="7", grad_accum_steps="4", epochs="2", max_train_steps="50",
              batch_size="16", eval_batch_size="32", output_dir="out", save_every="5", resume_from="latest",
              preprocessing_workers="3", ddp_timeout="60", adam_beta1="0.8", adam_beta2="0.99", adam_eps="1e-6",
              warmup_ratio="0.1", max_grad_norm="0.5", data_seed="7", save_total_limit="3", model_type="llama",
              config_name="some/config", config_overrides="num_hidden_layers=2")
NEEDS = dict(validation_file=["--train-file", "t.txt"], dataset_config=["--dataset", "wikitext"],
             model_type=["--tokenizer", "t"], config_overrides=["--config-name", "c"])


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


def changes(cfg: Config) -> dict:
    """The fields of `cfg` that differ from its task's defaults."""
    default = Config.for_task(cfg.task)
    return {name: value for name, value in dataclasses.asdict(cfg).items() if getattr(default, name) != value}


# TrainingArguments (run_clm.py, run_mlm.py) that lm.hf_flags.from_trainer() translates, and what they set.
TRAINER_CASES = [
    ("--do_train", {}),  # lm trains, then evaluates: without --do_train or --do_eval too
    ("--do_train --do_eval", {}),
    ("--do_train True --do_eval False", {}),
    ("--do_eval", {"eval_only": True}),
    ("--do_eval --eval-only", {"eval_only": True}),
    ("--use_cpu", {"device": "cpu"}),
    ("--use_cpu False", {}),
    ("--no_cuda", {"device": "cpu"}),
    ("--use_cpu --device cpu", {"device": "cpu"}),
    ("--bf16", {"precision": "bf16"}),
    ("--bf16 True --fp16 False", {"precision": "bf16"}),
    ("--bf16 --precision bf16", {"precision": "bf16"}),
    ("--fp16", {"precision": "fp16"}),
    ("--bf16 False", {"precision": "fp32"}),  # Trainer's precision without either
    ("--tf32", {}),  # lm allows TF32 on CUDA always
    ("--tf32 True", {}),
    ("--torch_compile", {"compile": "on"}),
    ("--torch_compile False", {"compile": "off"}),
    ("--max_steps 7", {"max_train_steps": 7}),
    ("--max_steps=-1", {}),  # Trainer's default: the epochs decide
    ("--warmup_steps 30", {"warmup_steps": 30}),
    ("--warmup_steps 0.1", {"warmup_ratio": 0.1}),  # below 1: a fraction of the steps, as in transformers 5
    ("--logging_steps 20", {"log_every": 20}),
    ("--logging_steps 20.0", {"log_every": 20}),
    ("--logging_strategy steps", {}),
    ("--eval_strategy steps --eval_steps 30", {"eval_every": 30}),
    ("--evaluation_strategy steps --eval_steps 30", {"eval_every": 30}),
    ("--eval_strategy steps", {"eval_every": 500}),  # Trainer's logging_steps
    ("--eval_strategy steps --logging_steps 20", {"eval_every": 20, "log_every": 20}),
    ("--eval_strategy steps --log-every 25", {"eval_every": 25, "log_every": 25}),
    ("--eval_strategy epoch", {}),  # lm evaluates at each epoch's end anyway
    ("--eval_strategy no --eval_steps 30", {}),
    ("--eval_steps 30", {}),  # as in Trainer: only with --eval_strategy steps
    ("--save_steps 40", {"save_every": 40}),  # Trainer's save_strategy is steps
    ("--save_strategy steps", {"save_every": 500}),
    ("--save_strategy steps --save_steps 40", {"save_every": 40}),
    ("--save_strategy epoch --save_steps 40", {"save_every": "epoch"}),
    ("--save_strategy no --save_steps 40", {}),
    ("--save_strategy epoch --save-every epoch", {"save_every": "epoch"}),
    *[(f"--optim {name}", {}) for name in ADAMW_NAMES],
    ("--report_to tensorboard", {}),
    ("--report_to none", {}),
    ("--report_to all", {}),
    ("--report_to tensorboard none", {}),
]


@pytest.mark.parametrize("argv, expected", TRAINER_CASES)
def test_trainer_flags_land_in_their_config_fields(argv, expected):
    assert changes(parse_args("clm", shlex.split(argv))) == expected


def test_every_trainer_flag_has_a_case():
    given = {word[2:].split("=")[0] for argv, _ in TRAINER_CASES for word in shlex.split(argv)}
    assert set(TRAINER_FLAGS) | set(TRAINER_OLD_NAMES) <= given


@pytest.mark.parametrize("form, value", [([], True), (["True"], True), (["true"], True), (["yes"], True),
                                         (["1"], True), (["False"], False), (["no"], False), (["0"], False)])
def test_booleans_take_the_forms_hf_users_write(form, value):
    assert parse_args("clm", ["--overwrite_output_dir", *form]).overwrite_output_dir is value
    assert parse_args("clm", ["--gradient_checkpointing", *form]).gradient_checkpointing is value
    assert parse_args("clm", ["--use_cpu", *form]).device == ("cpu" if value else "auto")
    assert parse_args("clm", ["--bf16", *form]).precision == ("bf16" if value else "fp32")


@pytest.mark.parametrize("hf", HF_IGNORED)
@pytest.mark.parametrize("value", [[], ["4"]])
def test_ignored_flags_change_nothing(hf, value):
    assert parse_args("clm", [f"--{hf}", *value]) == parse_args("clm", [])


# Settings lm can't follow, or that contradict each other, and what the one error line must say.
REFUSED = [
    *[(f"--{hf}{value}", f"--{hf} is not supported: {advice}") for hf, advice in HF_REFUSED.items()
      for value in ("", " x")],  # with or without a value
    ("--do_train False", "--do_train and --do_eval are both off, which leaves nothing to do"),
    ("--do_train False --do_eval False", "nothing to do"),
    ("--do_train --eval-only", "--do_train and --eval-only disagree: give one"),
    ("--bf16 --fp16", "--bf16 and --fp16 ask for two precisions: give one"),
    ("--bf16 --precision fp32", "--bf16 and --precision fp32 disagree: give one"),
    ("--fp16 --precision bf16", "--fp16 and --precision bf16 disagree: give one"),
    ("--bf16 False --precision bf16", "--bf16/--fp16 False and --precision bf16 disagree"),
    ("--bf16 maybe", "argument --bf16: expected True or False, got 'maybe'"),
    ("--tf32 False", "lm always lets CUDA GPUs run fp32 matmuls in TF32"),
    ("--use_cpu --device cuda", "--use_cpu and --device cuda disagree: give one"),
    ("--torch_compile --compile off", "--torch_compile True and --compile off disagree"),
    ("--max_steps 5 --max-train-steps 6", "--max_steps 5 and --max-train-steps 6 disagree"),
    ("--max_steps 5 --max_train_steps 6", "--max_steps 5 and --max-train-steps 6 disagree"),
    ("--warmup_steps 0.1 --warmup_ratio 0.2", "--warmup_steps 0.1 and --warmup-ratio 0.2 disagree"),
    ("--warmup_steps 1.5", "expected a whole number of steps or a fraction below 1, got '1.5'"),
    ("--logging_steps 20 --log-every 10", "--logging_steps 20 and --log-every 10 disagree"),
    ("--logging_steps 0", "argument --logging_steps: expected a whole number of optimizer steps, got '0'"),
    ("--logging_strategy epoch", "--logging_strategy epoch: lm logs every --log-every"),
    ("--save_steps 0.5", "0.5 is a fraction of the run, which lm does not take: give a number of optimizer steps"),
    ("--save_steps 10 --checkpointing_steps 20", "--save_steps 10 and --save-every 20 disagree"),
    ("--save_strategy epoch --save-every 5", "--save_strategy epoch and --save-every 5 disagree"),
    ("--save_strategy best", "--save_strategy best: lm keeps no best model"),
    ("--save_strategy sometimes", "--save_strategy sometimes: give no, steps or epoch"),
    ("--eval_strategy steps --eval_steps 5 --eval-every 7", "--eval_strategy steps and --eval-every 7 disagree"),
    ("--eval_strategy sometimes", "--eval_strategy sometimes: lm evaluates every --eval-every steps"),
    ("--eval_steps x", "argument --eval_steps: expected a whole number of optimizer steps, got 'x'"),
    ("--optim adafactor", "--optim adafactor: lm trains with torch's AdamW, Muon or SGD (--optimizer adamw|muon|sgd)"),
    ("--optim adamw_bnb_8bit", "--optim adamw_bnb_8bit: lm trains with torch's AdamW, Muon or SGD"),
    ("--report_to wandb", "--report_to wandb: lm logs to TensorBoard only (OUTPUT_DIR/logs)"),
    ("--report_to tensorboard,wandb", "--report_to wandb: lm logs to TensorBoard only"),
    ("--report_to", "argument --report_to: expected at least one argument"),
]


@pytest.mark.parametrize("argv, message", REFUSED)
def test_what_lm_cant_follow_ends_in_one_error_line(argv, message, tmp_path, capsys):
    # a missing --train-file: a command line wrongly accepted fails at once, with another message
    code = main("clm", ["--train-file", str(tmp_path / "missing.txt"), *shlex.split(argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_examples_of_advice():
    for hf, words in [("logging_dir", "OUTPUT_DIR/logs"), ("use_slow_tokenizer", "--tokenizer DIR"),
                      ("push_to_hub", "huggingface-cli upload"), ("deepspeed", "--fsdp")]:
        with pytest.raises(UsageError, match=words):
            parse_args("mlm", [f"--{hf}"])


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_help_lists_no_hf_spelling(task):
    text = build_parser(task).format_help()
    hidden = [*HF_ALIASES, *TRAINER_FLAGS, *TRAINER_OLD_NAMES, *HF_IGNORED, *HF_REFUSED]
    assert not [hf for hf in hidden if re.search(rf"--{hf}\b", text)]  # --optim is in --optimizer


def test_prefixes_are_not_abbreviations():
    # --output would match both --output-dir and --output_dir; no flag is taken from a prefix
    with pytest.raises(UsageError, match="unrecognized arguments: --output"):
        parse_args("clm", ["--output", "x"])


def test_hf_flags_depends_on_nothing_of_lm_config():
    # lm.config builds the CLI from lm.hf_flags: one direction, no import inside a function to dodge a cycle
    nodes = list(ast.walk(ast.parse(Path(hf_flags.__file__).read_text())))
    imported = ({node.module for node in nodes if isinstance(node, ast.ImportFrom)}
                | {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names})
    assert imported == {"__future__", "argparse", "lm.errors"}
    # the Config's values it names are the Config's
    with pytest.raises(UsageError, match=re.escape(f"(--optimizer {'|'.join(OPTIMIZERS)})")):
        hf_flags.from_trainer({"optim": "adafactor"}, {})

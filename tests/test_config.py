import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from lm.config import Config, build_parser, options_table, parse_args
from lm.errors import UsageError


def test_every_option_has_a_flag_and_help():
    parser = build_parser("clm")
    flags = {a.dest: a for a in parser._actions if a.help != argparse.SUPPRESS}  # not the HF spellings
    for f in dataclasses.fields(Config):
        if f.name == "task":
            continue
        assert f.name in flags, f.name
        assert flags[f.name].help


def test_parse_args_types_and_task_defaults():
    cfg = parse_args("mlm", ["--mlm-prob", "0.2", "--block-size", "64", "--line-by-line", "--max-train-steps", "5"])
    assert (cfg.task, cfg.mlm_prob, cfg.block_size, cfg.line_by_line, cfg.max_train_steps) == ("mlm", 0.2, 64, True, 5)
    assert cfg.head_lr == Config.for_task("mlm").head_lr
    assert parse_args("clm", []) == Config.for_task("clm")


@pytest.mark.parametrize("argv, message", [
    (["--block-size", "0"], "--block-size must be positive"),
    (["--mlm-prob", "1"], "--mlm-prob must be between 0 and 1"),
    (["--batch-size", "-1"], "--batch-size must be a positive integer"),
    (["--lr", "0"], "--lr must be positive"),
    (["--max-train-steps", "0"], "--max-train-steps must be a positive integer"),
    (["--precision", "fp8"], "invalid choice"),
    (["--block-size", "abc"], "invalid int value"),
    (["--dataset", "x", "--train-file", "y.txt"], "either --dataset or --train-file"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32 - 1\], got -1$"),
    (["--seed", str(2**32)], r"--seed must be in \[0, 2\*\*32 - 1\], got 4294967296$"),
    (["--document-boundaries", "--line-by-line"], "--line-by-line examples are one text each already"),
    (["--eval-stride", "-1"], "--eval-stride must be a positive integer"),
])
def test_bad_settings_raise_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args("mlm", argv)


def test_data_seed_sets_the_order_alone():
    assert parse_args("clm", ["--seed", "3"]).shuffle_seed == 3
    cfg = parse_args("clm", ["--seed", "3", "--data-seed", "5"])
    assert (cfg.seed, cfg.shuffle_seed) == (3, 5)
    with pytest.raises(UsageError, match="--data-seed must be in"):
        parse_args("clm", ["--data-seed", "-1"])


def test_line_by_line_is_mlm_only():
    with pytest.raises(UsageError, match="masked LM only"):
        parse_args("clm", ["--line-by-line"])


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_the_docs_explain_every_flag(task):
    # each flag (Hugging Face's spellings too) as `--flag` or `--flag VALUE` on a page of its own topic: the
    # options table of docs/options.md, generated from the same help texts, doesn't count
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    text = "".join(p.read_text(encoding="utf-8") for p in pages).replace(options_table(), "")
    missing = [a.option_strings[0] for a in build_parser(task)._actions if a.option_strings
               and a.option_strings[0] != "-h" and not re.search(rf"`{re.escape(a.option_strings[0])}[` ]", text)]
    assert not missing


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_help_of_the_scripts_renders_every_flag(task):
    from conftest import run_script

    r = run_script(task, "--help", timeout=120)
    assert r.returncode == 0, r.stderr
    flags = [a.option_strings[0] for a in build_parser(task)._actions if a.help != argparse.SUPPRESS]
    missing = [f for f in flags if f not in r.stdout]
    assert not missing and "~30%" in r.stdout  # a literal % in a help text


@pytest.mark.parametrize("argv", [["--help"], ["--batch-size", "two"], ["--mlm-prob", "2"], ["--no-such-flag"]])
def test_help_and_usage_errors_answer_before_torch_is_imported(argv):
    # what makes them answer at once: torch and transformers take seconds to import
    import subprocess
    import sys

    from conftest import ENV, ROOT

    code = ("import sys; from lm.cli import main\n"
            "try:\n    code = main('mlm', sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
            "print('heavy:', heavy, 'code:', code)")
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.splitlines()[-1] == f"heavy: [] code: {0 if argv == ['--help'] else 2}", r.stdout + r.stderr

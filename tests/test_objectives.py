"""The objective seam: every task-specific decision is in lm/objectives.py, and a new objective plugs in."""

import dataclasses
import re
from pathlib import Path

import pytest

from lm.config import Config, build_parser, parse_args
from lm.errors import UsageError
from lm.objectives import CLM, MLM, find

LM = Path(__file__).resolve().parents[1] / "lm"


def test_no_code_outside_objectives_compares_task_names():
    pattern = re.compile(r"""task *[!=]=|== *"(clm|mlm)"|"(clm|mlm)" *[!=]=""")
    found = [f"{path.name}:{n}: {line.strip()}" for path in sorted(LM.glob("*.py")) if path.name != "objectives.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found


def test_a_new_objective_gets_the_cli_defaults_and_checks_of_its_own():
    def no_small_blocks(cfg):
        if cfg.block_size is not None and cfg.block_size < 16:
            raise UsageError("--block-size must be at least 16 for this objective")

    ours = dataclasses.replace(MLM, name="test-objective", description="test model", check=no_small_blocks,
                               defaults=dict(MLM.defaults, lr=3e-3))
    assert find("test-objective") is ours
    assert "Fine-tune a test model." in build_parser(ours).format_help()
    cfg = parse_args(ours, ["--block-size", "32"])
    assert (cfg.task, cfg.lr, cfg.head_lr) == ("test-objective", 3e-3, MLM.defaults["head_lr"])
    assert Config.for_task("test-objective", block_size=32) == cfg
    with pytest.raises(UsageError, match="at least 16"):
        parse_args(ours, ["--block-size", "8"])
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        Config.for_task("nope")


def test_the_builtin_objectives_differ_only_in_their_records():
    assert (CLM.model_class, MLM.model_class) == ("AutoModelForCausalLM", "AutoModelForMaskedLM")
    with pytest.raises(UsageError, match="--line-by-line is for masked LM only"):
        Config.for_task("clm", line_by_line=True)
    assert Config.for_task("mlm", line_by_line=True).line_by_line


def test_the_built_in_names_stay_theirs():
    assert dataclasses.replace(CLM) is not CLM and find("clm") is CLM  # an equal copy is fine
    with pytest.raises(ValueError, match="'mlm' is a built-in objective"):
        dataclasses.replace(MLM, description="something else")

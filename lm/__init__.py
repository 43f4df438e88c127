"""lm: fine-tune causal and masked language models with a plain PyTorch loop."""

from lm.config import Config
from lm.errors import UsageError

__all__ = ["Config", "UsageError", "train"]


def train(cfg, **kwargs):
    """Run one fine-tuning (see lm.train.train); imported lazily to keep `import lm` light."""
    from lm.train import train as _train

    return _train(cfg, **kwargs)

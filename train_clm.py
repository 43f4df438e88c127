"""Fine-tune a causal language model: python train_clm.py --block-size 128 (see --help)."""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main("clm"))

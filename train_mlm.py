"""Fine-tune a masked language model: python train_mlm.py --mlm-prob 0.15 (see --help)."""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main("mlm"))

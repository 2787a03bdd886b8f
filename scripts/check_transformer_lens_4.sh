#!/usr/bin/env bash
# A second environment with TransformerLens 4.x (TransformerBridge only, no HookedTransformer,
# no sae-lens) at .venv-tl4, and the backend parity tests run in it: every backend that
# TransformerLens 4 supports (hf, bridge, nnsight) must agree with HF as under 3.x, and the
# transformer_lens backend must refuse with a one-line error. Prints the install and test times.
#   scripts/check_transformer_lens_4.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv-tl4/bin/python ] || "$PYTHON" -m venv .venv-tl4
start=$(date +%s)
# The exact versions of constraints.txt, except TransformerLens and what only sae-lens needs.
grep -v -E "^(transformer-lens|transformer_lens|sae-lens|sae_lens)==" constraints.txt > .venv-tl4/constraints.txt
.venv-tl4/bin/python -m pip install --quiet --upgrade pip
.venv-tl4/bin/python -m pip install --quiet -c .venv-tl4/constraints.txt -e ".[nnsight,plots]" \
  "transformer-lens>=4,<5" pytest pytest-timeout hypothesis
installed=$(date +%s)
.venv-tl4/bin/python -c "import importlib.metadata as m; print('transformer-lens', m.version('transformer-lens'))"
HF_HUB_OFFLINE=1 .venv-tl4/bin/python -m pytest -q -p no:cacheprovider -m "not demo" \
  tests/test_backends.py tests/test_hooks_unit.py tests/test_operators.py tests/test_families.py \
  tests/test_extending.py tests/test_tl4.py
echo "install: $((installed - start)) s, tests: $(($(date +%s) - installed)) s"

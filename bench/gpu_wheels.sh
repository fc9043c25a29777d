#!/usr/bin/env bash
# What bench/gpu.py needs on the GPU check machine that is not installed there (no network
# there; see ../shared/GPU.md): the wheels of TRL, datasets and what they and posttrain's
# training path import, bitsandbytes for QLoRA, and SmolLM2's tokenizer (the GGUF it ships in is
# too big to travel). Versions are the ones posttrain is tested with here.
#
#   bash bench/gpu_wheels.sh            # here, with network: fill .whl/ (git-ignored, ~62 MB)
#   bash bench/gpu_wheels.sh install    # there: install into /tmp/site each one not already importable
#   PYTHONPATH=/tmp/site:. python bench/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
SITE=${SITE:-/tmp/site}
# here the project's virtual environment (the tokenizer comes from posttrain); there the machine's python
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || command -v python)}

# distribution==version, then the module whose absence means the machine needs it
PACKAGES=(
  "trl==1.16.0 trl"
  "datasets==5.2.0 datasets"
  "dill==0.4.1 dill"
  "multiprocess==0.70.19 multiprocess"
  "xxhash==4.1.0 xxhash"
  "bitsandbytes==0.50.2 bitsandbytes"
  "SQLAlchemy==2.1.9 sqlalchemy"
  "alembic==1.20.1 alembic"
  "Mako==1.4.3 mako"
  "pydantic==2.14.4 pydantic"
  "pydantic_core==2.50.5 pydantic_core"
  "annotated-types==0.8.0 annotated_types"
  "typing-inspection==0.4.5 typing_inspection"
  "tensorboard==2.21.0 tensorboard"
  "protobuf==7.36.2 google.protobuf"
  "absl-py==2.5.1 absl"
)

download() {
  mkdir -p "$WHEELS"
  for entry in "${PACKAGES[@]}"; do
    # Python 3.12 on manylinux x86-64, as on the GPU machine (whatever runs this script here)
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform any -d "$WHEELS" "${entry%% *}"
  done
  "$PYTHON" -c "
from posttrain.models import _load_smollm2_tokenizer, _smollm2_gguf
_load_smollm2_tokenizer(_smollm2_gguf()).save_pretrained('$WHEELS/tokenizer')"
  du -sh "$WHEELS"
}

install() {
  local needed=()
  for entry in "${PACKAGES[@]}"; do
    spec=${entry%% *} module=${entry##* }
    if PYTHONPATH="$SITE" "$PYTHON" -c "import $module" 2>/dev/null; then
      continue  # the machine's own copy wins: its torch and transformers were built against it
    fi
    # wheel names spell the distribution with underscores, in either case
    wheel=$(find "$WHEELS" -maxdepth 1 -iname "$(echo "${spec%%==*}" | tr '-' '_')-${spec##*==}-*.whl")
    if [ -z "$wheel" ]; then
      echo "no wheel for $spec in $WHEELS: run bash bench/gpu_wheels.sh where there is network" >&2
      exit 1
    fi
    needed+=("$wheel")
  done
  if [ ${#needed[@]} -gt 0 ]; then
    # one call: repeated --target installs would not replace what an earlier one created (bin/)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "${needed[@]}"
    printf 'installed %s\n' "${needed[@]##*/}"
  fi
  "$PYTHON" -m pip show peft 2>/dev/null | grep -i '^version' | sed 's/^/peft (posttrain pins < 0.22): /'
}

case "${1:-download}" in
  download) download ;;
  install) install ;;
  *) echo "usage: $0 [download|install]" >&2; exit 2 ;;
esac

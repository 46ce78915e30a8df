#!/usr/bin/env bash
# Idempotent environment set-up for speechbrain-blspkd.
#
# Creates $VENV (default .venv) with uv, installs torch (CPU or CUDA build),
# torchaudio, the pinned requirements and the package itself (editable,
# bytecode compiled) with the browser demo's packages (requirements-demo.txt),
# installs the Debian tools the data preparation needs (espeak-ng, flite,
# sox) and, as root, Debian's chromium for the browser tests, when they are
# missing,
# and makes torchaudio usable beside a CPU-only torch
# (tools/fix_torchaudio.py).  A second run only checks.
#
# Environment:
#   VENV            venv folder (default .venv)
#   TORCH           cpu (default) or cuda
#   TORCH_VERSION   default 2.13.0
#   TORCH_FIND_LINKS  folder/URL with torch wheels (default: pip's find-links)
#   TORCH_INDEX     extra index for torch (default for cpu when no find-links:
#                   https://download.pytorch.org/whl/cpu)
#   SKIP_APT=1      do not touch Debian packages
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH=${TORCH:-cpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHAUDIO_VERSION=${TORCHAUDIO_VERSION:-2.11.0}
PY=${PYTHON:-python3}
stamp="$VENV/.blspkd-installed"
want="$(cat requirements.txt requirements-demo.txt setup.py tools/install.sh tools/fix_torchaudio.py | sha256sum | cut -c1-16)-$TORCH-$TORCH_VERSION"

# --- Debian tools -----------------------------------------------------------
if [ "${SKIP_APT:-0}" != 1 ]; then
  # espeak-ng + sox synthesise speech (flite: the second training engine,
  # speechbrain_blspkd.dataprep.tts.synthesise_flite); the fortunes packages hold the
  # SynthSpeech sentences (speechbrain_blspkd.dataprep.synthspeech), and the
  # Bible, WordNet, more fortunes and the Dhammapada its extra English
  # training sentences (speechbrain_blspkd.dataprep.english_text).
  missing=()
  for pkg in espeak-ng flite sox fortunes fortunes-min fortunes-de fortunes-es \
             fortunes-it fortunes-br bible-kjv bible-kjv-text wordnet-base \
             fortune-anarchism tfortunes display-dhammapada; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" \
      || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[install] apt-get install ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # Debian's chromium for the browser demo's tests (driven by playwright's
  # Python package through executable_path; no browser download). Installed
  # only as root (CI runs as root) and never fatal: without it the browser
  # tests skip, saying why.
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      echo "[install] apt-get install chromium (browser tests)"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; } \
        || echo "[install] warning: chromium could not be installed; the browser tests will skip" >&2
    else
      echo "[install] note: chromium missing (not root); the browser tests will skip" >&2
    fi
  fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[install] $VENV is up to date"
  exit 0
fi

# --- venv + uv --------------------------------------------------------------
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if [ ! -x "$VENV/bin/uv" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check uv
fi
UV=("$VENV/bin/uv" pip install --python "$VENV/bin/python" --compile-bytecode)

# --- torch ------------------------------------------------------------------
torch_args=()
if [ "$TORCH" = cpu ]; then
  spec="torch==${TORCH_VERSION}+cpu"
  links=${TORCH_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}
  if [ -n "$links" ]; then
    for l in $links; do torch_args+=(--find-links "$l"); done
  else
    torch_args+=(--extra-index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
                 --index-strategy unsafe-best-match)
  fi
elif [ "$TORCH" = cuda ]; then
  spec="torch==${TORCH_VERSION}"
  [ -n "${TORCH_INDEX:-}" ] && torch_args+=(--extra-index-url "$TORCH_INDEX")
else
  echo "[install] TORCH must be cpu or cuda, got '$TORCH'" >&2; exit 2
fi
echo "[install] $spec"
"${UV[@]}" -q "${torch_args[@]}" "$spec"
# torchaudio has no dependency on torch in its metadata; --no-deps keeps the
# torch chosen above.
"${UV[@]}" -q --no-deps "torchaudio==${TORCHAUDIO_VERSION}"

# --- the rest, with torch held to what is installed ---------------------------
cons=$(mktemp)
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" >"$cons"
echo "[install] requirements.txt + requirements-demo.txt + package (editable)"
"${UV[@]}" -q -c "$cons" "${torch_args[@]}" -r requirements.txt \
  -r requirements-demo.txt -e .
rm -f "$cons"

# --- torchaudio beside a CPU-only torch ---------------------------------------
"$VENV/bin/python" tools/fix_torchaudio.py

echo "$want" >"$stamp"
echo "[install] done in $(( $(date +%s) - t0 )) s; venv size $(du -sh "$VENV" | cut -f1)"

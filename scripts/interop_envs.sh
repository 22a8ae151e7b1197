#!/usr/bin/env bash
# The other tools' own libraries, each in its own virtual environment under .interop/ (their pins clash with
# ours): Label Studio (server and label-studio-sdk, for the ML-backend test and its brush RLE decoder) and
# Datumaro (CVAT and VOC readers). The tests find them there, or through LABELSMART_LS_PYTHON and
# LABELSMART_DATUMARO_PYTHON, and are skipped, saying so, without them.
set -euo pipefail
cd "$(dirname "$0")/.."
make_env() {  # name, requirement
  local dir=".interop/$1"
  if [ -x "$dir/bin/python" ] && "$dir/bin/pip" show -q "${2%%==*}" >/dev/null 2>&1; then
    return
  fi
  rm -rf "$dir"
  python -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check "$2"
}
make_env labelstudio label-studio==1.23.2 &
ls_pid=$!
make_env datumaro datumaro==1.13.12
wait "$ls_pid"

#!/bin/sh
# Build the agent's wheel from this checkout into the pi-gen stage's files/, so the image gets
# exactly this tree's agent (its dependencies still come from the package index).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
rm -f "$here"/stage-ember/00-install-ember/files/ember_fl-*.whl
python3 -m pip wheel --no-deps --wheel-dir "$here/stage-ember/00-install-ember/files" "$repo"
ls "$here"/stage-ember/00-install-ember/files/ember_fl-*.whl

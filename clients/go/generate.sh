#!/usr/bin/env bash
# Regenerates the committed Go code (idemdv1/) from proto/idemd/v1 with the
# plugin versions pinned in tools/go.mod and buf as the compiler (scripts/test
# installs it; `pip install buf-bin` or `npm i @bufbuild/buf` elsewhere).
#
#   clients/go/generate.sh          rewrite idemdv1/ in place
#   clients/go/generate.sh DIR      write DIR/idemdv1/ instead (scripts/test
#                                   diffs that against the committed code)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=$(mkdir -p "${1:-$here}" && cd "${1:-$here}" && pwd)
command -v buf >/dev/null || { echo "generate.sh: buf not found on PATH" >&2; exit 1; }

bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
(cd "$here/tools" && go build -o "$bin/" \
  google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc)

# Stale files must not survive a regeneration in place.
rm -rf "$out/idemdv1"
cd "$repo"
PATH="$bin:$PATH" buf generate proto --template "$here/buf.gen.yaml" --output "$out"

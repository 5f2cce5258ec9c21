#!/usr/bin/env bash
# kustomize at a pinned version, built once with `go install` through the Go
# module proxy and cached in $AFTERGLOW_CACHE_DIR/bin (~/.cache/afterglow/bin).
#   k8s/kustomize.sh build k8s/overlays/prod    # any kustomize arguments
#   k8s/kustomize.sh --path                     # print the binary's path (fetch it if missing)
# AFTERGLOW_KUSTOMIZE=/path/to/kustomize uses that binary instead (no fetch).
# Idempotent and safe to run concurrently: the binary is built in a temporary
# directory and moved into place.
set -euo pipefail

version="${AFTERGLOW_KUSTOMIZE_VERSION:-v5.7.1}"
cache="${AFTERGLOW_CACHE_DIR:-$HOME/.cache/afterglow}"
bin="${AFTERGLOW_KUSTOMIZE:-$cache/bin/kustomize-$version}"

if [[ ! -x $bin ]]; then
  if [[ -n ${AFTERGLOW_KUSTOMIZE:-} ]]; then
    echo "kustomize.sh: AFTERGLOW_KUSTOMIZE=$bin is not an executable" >&2
    exit 1
  fi
  go="$(command -v go || true)"
  [[ -n $go || ! -x /usr/local/go/bin/go ]] || go=/usr/local/go/bin/go
  if [[ -z $go ]]; then
    echo "kustomize.sh: kustomize $version is not in $cache/bin and Go is not installed to build it" >&2
    exit 127
  fi
  mkdir -p "$cache/bin"
  tmp="$(mktemp -d "$cache/bin/.kustomize.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  echo "kustomize.sh: building kustomize $version with go install (once)" >&2
  GOBIN="$tmp" GOTOOLCHAIN=local CGO_ENABLED=0 \
    "$go" install "sigs.k8s.io/kustomize/kustomize/v5@$version" >&2
  mv -f "$tmp/kustomize" "$bin"
fi

if [[ ${1:-} == --path ]]; then
  echo "$bin"
  exit 0
fi
exec "$bin" "$@"

#!/usr/bin/env bash
# Installs every Debian 12 package the project needs to build, test and run.
# Idempotent: when all packages are already installed it does nothing (no apt-get call at all).
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config ccache git
  clang libclang-rt-14-dev llvm lld
  libtorch-dev libopenblas0-openmp
  libgrpc++-dev libssl-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libspdlog-dev libfmt-dev prometheus-cpp-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libpng-dev libjpeg-dev
)
# The client tests (clients/): Debian's gRPC for Python (stubs come from protoc +
# grpc_python_plugin above), Node.js and npm. A node/npm already on PATH is used as it is
# (NodeSource's nodejs bundles npm and conflicts with Debian's npm package).
PACKAGES+=(python3-grpcio python3-protobuf)
command -v node >/dev/null 2>&1 || PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || PACKAGES+=(npm)
# tests/prometheus_test: a real Prometheus server scrapes diffusion-server's metrics port.
PACKAGES+=(prometheus)
# handlers/tokenizers: T5's SentencePiece models (spiece.model).
PACKAGES+=(libsentencepiece-dev)
# tests/deploy_test: nginx as the L7 gRPC load balancer in front of replicas (deploy/nginx/).
PACKAGES+=(nginx)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install_deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Multi-stage image of diffusion-server (entrypoint) and diffusion-cli.
#
# The build stage installs dependencies with the same script `make` uses (scripts/install_deps.sh:
# one source of truth), configures like `make` does, builds the two binaries only, and collects
# the runtime shared libraries they need; the runtime stage carries only those and runs as a
# non-root user.
#
#   docker build -t diffusion-server .
#   docker run --rm -p 50051:50051 -p 9464:9464 diffusion-server            # embedded demo model
#   docker run --rm -p 50051:50051 -p 9464:9464 -v /models:/models:ro diffusion-server \
#       --model_root=/models --config=/models/preload.json --log_format=json
#   docker run --rm --entrypoint diffusion-cli diffusion-server describe FluxTransformer2DModel
#
# Arguments after the image name replace CMD (not the defaults below them: every flag keeps its
# built-in default, see `docker run --rm diffusion-server --help`). The server listens on
# 0.0.0.0 (--host default) so the published ports reach it.
#
# Shutdown: the server handles SIGTERM itself (it is PID 1 here and blocks the signal for sigwait,
# so the signal is not dropped): NOT_SERVING, stop accepting, let running calls finish within
# --grace_period_s (default 30 s), exit 0. Give the runtime at least that long before it kills:
# `docker stop -t 40`; deploy/kubernetes adds its preStop delay: `terminationGracePeriodSeconds: 50`.
#
# Health: HEALTHCHECK runs `diffusion-cli health` against the standard gRPC health service
# (grpc.health.v1, service "" = the process is live); `docker ps` shows healthy/unhealthy.
# Kubernetes ignores HEALTHCHECK and probes the same service natively (deploy/kubernetes: liveness
# on "", readiness on a model instance name, e.g. "default").
#
# CUDA: `docker build --build-arg TORCH_VARIANT=cuda -t diffusion-server:cuda .` builds against
# the LibTorch CUDA distribution (LIBTORCH_URL: a cxx11-ABI libtorch zip from pytorch.org, matching
# your driver's CUDA) instead of Debian's CPU-only libtorch-dev, which the install script still
# installs but CMAKE_PREFIX_PATH then outranks. The runtime stage copies the CUDA libraries the
# binaries link (ldd); the driver comes from the host (NVIDIA Container Toolkit:
# `docker run --gpus all ...`). Load models with device "cuda".
ARG TORCH_VARIANT=cpu
FROM debian:12 AS build
WORKDIR /src
COPY scripts/install_deps.sh scripts/install_deps.sh
RUN scripts/install_deps.sh
ARG TORCH_VARIANT
ARG LIBTORCH_URL=https://download.pytorch.org/libtorch/cu121/libtorch-cxx11-abi-shared-with-deps-2.3.1%2Bcu121.zip
RUN if [ "$TORCH_VARIANT" = cuda ]; then \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends curl unzip \
      && curl -fsSL -o /tmp/libtorch.zip "$LIBTORCH_URL" && unzip -q /tmp/libtorch.zip -d /opt \
      && rm /tmp/libtorch.zip; \
    elif [ "$TORCH_VARIANT" != cpu ]; then echo "TORCH_VARIANT must be cpu or cuda" >&2; exit 1; fi
COPY . .
RUN TORCH_FLAGS=""; if [ "$TORCH_VARIANT" = cuda ]; then TORCH_FLAGS="-DCMAKE_PREFIX_PATH=/opt/libtorch"; fi \
 && make configure BUILD_DIR=/src/build CMAKE_FLAGS="-DDS_BUILD_FUZZ=OFF $TORCH_FLAGS" \
 && cmake --build /src/build -j "$(nproc)" --target diffusion-server diffusion-cli ds_sentencepiece_shim \
 && mkdir -p /out/bin /out/lib \
 && cp /src/build/server/diffusion-server /src/build/tools/cli/diffusion-cli /out/bin/ \
 && cp /src/build/handlers/tokenizers/libds_sentencepiece_shim.so /out/lib/ \
 && ldd /out/bin/diffusion-server /out/bin/diffusion-cli /out/lib/libds_sentencepiece_shim.so \
      | awk '/=> \//{print $3}' | sort -u | xargs -I{} cp -L {} /out/lib/

FROM debian:12-slim AS runtime
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libopenblas0-openmp ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /srv --create-home diffusion
COPY --from=build /out/lib/ /opt/diffusion/lib/
COPY --from=build /out/bin/ /opt/diffusion/bin/
ENV LD_LIBRARY_PATH=/opt/diffusion/lib PATH=/opt/diffusion/bin:$PATH
USER 10001
WORKDIR /srv
# gRPC (diffusion.v1.DiffusionService, grpc.health.v1, reflection) and Prometheus /metrics.
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["diffusion-cli", "health", "--target=127.0.0.1:50051", "--timeout=3"]
ENTRYPOINT ["diffusion-server"]
CMD ["--host=0.0.0.0", "--port=50051", "--metrics_port=9464"]

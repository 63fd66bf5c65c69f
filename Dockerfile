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
# `docker stop -t 40`, Kubernetes `terminationGracePeriodSeconds: 40`.
#
# Health: no Docker HEALTHCHECK is declared. Kubernetes probes the standard gRPC health service
# natively (`grpc: {port: 50051}` liveness probe: service "" = process live; readiness with
# `service: <model instance>`, e.g. "default", = that model is READY). For plain Docker, the image's
# CLI can serve as the check:
#   docker run --health-cmd 'diffusion-cli health --target=127.0.0.1:50051' ...
FROM debian:12 AS build
WORKDIR /src
COPY scripts/install_deps.sh scripts/install_deps.sh
RUN scripts/install_deps.sh
COPY . .
RUN make configure BUILD_DIR=/src/build CMAKE_FLAGS="-DDS_BUILD_FUZZ=OFF" \
 && cmake --build /src/build -j "$(nproc)" --target diffusion-server diffusion-cli \
 && mkdir -p /out/bin /out/lib \
 && cp /src/build/server/diffusion-server /src/build/tools/cli/diffusion-cli /out/bin/ \
 && ldd /out/bin/diffusion-server /out/bin/diffusion-cli | awk '/=> \//{print $3}' | sort -u \
      | xargs -I{} cp -L {} /out/lib/

FROM debian:12-slim AS runtime
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libopenblas0-openmp ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /srv diffusion
COPY --from=build /out/lib/ /opt/diffusion/lib/
COPY --from=build /out/bin/ /opt/diffusion/bin/
ENV LD_LIBRARY_PATH=/opt/diffusion/lib PATH=/opt/diffusion/bin:$PATH
USER 10001
WORKDIR /srv
# gRPC (diffusion.v1.DiffusionService, grpc.health.v1, reflection) and Prometheus /metrics.
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["diffusion-server"]
CMD ["--host=0.0.0.0", "--port=50051", "--metrics_port=9464"]

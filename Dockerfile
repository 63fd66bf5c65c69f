# Multi-stage image. The build stage installs dependencies with the same script `make` uses
# (scripts/install_deps.sh: one source of truth), builds, and collects the runtime shared libraries
# the binaries need; the runtime stage carries only those and runs as a non-root user.
FROM debian:12 AS build
WORKDIR /src
COPY scripts/install_deps.sh scripts/install_deps.sh
RUN scripts/install_deps.sh
COPY . .
RUN make build BUILD_DIR=/src/build \
 && mkdir -p /out/bin /out/lib \
 && cp /src/build/tools/cli/diffusion-cli /out/bin/ \
 && ldd /out/bin/diffusion-cli | awk '/=> \//{print $3}' | sort -u \
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
ENTRYPOINT ["diffusion-cli"]
CMD ["describe", "FluxTransformer2DModel", "--verbose"]

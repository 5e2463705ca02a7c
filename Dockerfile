# The hivesync binary and the dashboard, for compose.yaml. Build: docker build -t hivesync .
# no -dev packages: HTTPS is rustls (ring), which needs only the image's C compiler
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY loadtest loadtest
COPY tests tests
RUN cargo build --release -p hivesync

FROM debian:bookworm-slim
# the system's CA roots for HTTPS remotes, ssh for SSH remotes, curl for the health
# check, git for mirror housekeeping (git gc: deltas across packs and a commit-graph,
# which gitoxide cannot write yet; without it housekeeping uses gitoxide alone)
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates openssh-client curl git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data hivesync && mkdir -p /data && chown hivesync /data
COPY --from=build /src/target/release/hivesync /usr/local/bin/hivesync
COPY static /srv/hivesync/static
ENV HIVESYNC_DATA_DIR=/data HIVESYNC_STATIC_DIR=/srv/hivesync/static HIVESYNC_LISTEN=0.0.0.0:8080
USER hivesync
EXPOSE 8080
ENTRYPOINT ["hivesync"]
CMD ["serve"]

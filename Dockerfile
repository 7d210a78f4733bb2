# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target supervisor -t REGISTRY/openshell/openshell-supervisor:0.1.0 .   # the image volume
#   docker build --target gateway    -t REGISTRY/openshell/openshell-gateway:0.1.0 .
#
# The release builds both with buildah, for linux/amd64 and linux/arm64, through
# imagevolume/release.py (docs/release.md); tests/e2e/test_release_images.py builds this file the
# same way without Docker, from a Debian bookworm base made with mmdebstrap (DEBIAN_BASE).
#
# The supervisor image is FROM scratch and holds the supervisor's self-contained tree (its loader,
# libraries, interpreter and packages; imagevolume/bundle.py): it is mounted as a Kubernetes image
# volume and run from there, never run as an image. imagevolume/oci.py builds the same content
# without any builder and with a reproducible digest (docs/image-volume.md). Pass VERSION, REVISION
# and CREATED (RFC 3339) as build arguments, and SOURCE_DATE_EPOCH too for reproducible layers
# (BuildKit >= 0.13 and buildah --timestamp honour it).

# Both stages start from Debian bookworm's slim image: any image with the same content will do
# (the tests build from `mmdebstrap --variant=minbase bookworm`, which is what debian:*-slim is).
ARG DEBIAN_BASE=debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z

# --- build: the supervisor's self-contained tree ---------------------------------------------------
# Debian's own python3 (3.11 on bookworm), not the python:* images' /usr/local build: the tree
# carries Debian's interpreter and the libraries it links, found with ldd.
FROM ${DEBIAN_BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only the bundle's inputs (imagevolume/bundle.py SOURCES), so that a change elsewhere in the
# repository keeps the cached layers.
COPY pyproject.toml README.md ./
COPY openshell_wire ./openshell_wire
COPY supervisor ./supervisor
COPY imagevolume/bundle.py imagevolume/launcher.c ./imagevolume/
# bundle.py installs the supervisor's dependencies with pip (from a venv of /usr/bin/python3),
# copies the interpreter, its standard library and every library they load, compiles the static
# launcher (gcc), and writes /out/tree. PIP_CERT: a CA bundle for pip where the build host's way
# out inspects TLS (the builder mounts it; empty: pip's own); a build argument, so not in the image.
ARG SOURCE_DATE_EPOCH=0
ARG PIP_CERT
RUN python3 imagevolume/bundle.py --out /out \
 && /out/tree/bin/openshell-supervisor --help >/dev/null

# --- supervisor: the image volume's content, the tree at its root ---------------------------------
FROM scratch AS supervisor
ARG VERSION
ARG REVISION
ARG CREATED
COPY --from=build --chown=0:0 /out/tree/ /
LABEL org.opencontainers.image.title="openshell-supervisor" \
      org.opencontainers.image.description="The self-contained OpenShell sandbox supervisor (its loader, libraries, interpreter and packages), meant to be mounted read-only as a Kubernetes image volume and run from there." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/openshell/openshell-supervisor" \
      org.opencontainers.image.licenses="Apache-2.0"

# --- gateway: the control plane --------------------------------------------------------------------
# Debian's python3 (3.11) in a venv rather than FROM python:3.11-slim-bookworm: the same Debian
# bookworm underneath and the same CPython minor version (the same wheels), but a base any builder
# can make from Debian's archive alone (mmdebstrap), so the image the tests run is built by this
# very stage. Debian's python3 refuses `pip install` outside a venv (PEP 668).
FROM ${DEBIAN_BASE} AS gateway
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/openshell/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /src
COPY pyproject.toml README.md ./
COPY openshell_wire ./openshell_wire
COPY supervisor ./supervisor
COPY gateway ./gateway
ARG PIP_CERT
RUN python3 -m venv /opt/openshell \
 && /opt/openshell/bin/pip install --no-cache-dir . \
 && rm -rf /src \
 && groupadd --system --gid 10001 openshell \
 && useradd --system --uid 10001 --gid openshell --home-dir /var/lib/openshell --create-home \
      --shell /usr/sbin/nologin openshell
# The labels last: a new revision then changes no layer above them (the build cache keeps them).
ARG VERSION
ARG REVISION
ARG CREATED
LABEL org.opencontainers.image.title="openshell-gateway" \
      org.opencontainers.image.description="The OpenShell gateway: holds the supervisors' sessions and stores their events." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/openshell/openshell-supervisor" \
      org.opencontainers.image.licenses="Apache-2.0"
WORKDIR /var/lib/openshell
USER 10001:10001
EXPOSE 7070 7080
ENTRYPOINT ["openshell-gateway"]
CMD ["serve"]

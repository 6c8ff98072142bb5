# syntax=docker/dockerfile:1
#
# recoveryd: the coordinator (the default command) and, as a base for trainer
# images, the agent library with torch.
#
#   docker build -t ghcr.io/recoveryd/recoveryd:cpu .          # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t ghcr.io/recoveryd/recoveryd:cuda .
#
# deploy/k8s uses these two tags (overlays cpu and gpu).
#
# TORCH_VARIANT names a wheel index under https://download.pytorch.org/whl/
# (cpu, cu126, cu128, ...: whichever exist for TORCH_VERSION). The CUDA wheels
# carry their CUDA libraries (the nvidia-* packages from the same index), so
# the same python:3.11-slim base serves both: on a GPU node the NVIDIA
# container runtime mounts the driver (libcuda) into the container, and
# nothing else is needed in the image. The coordinator itself never imports
# torch; the CPU image is the one to run it from.
#
# No HEALTHCHECK: Kubernetes probes the coordinator through the standard
# grpc.health.v1 service on its gRPC port (deploy/k8s), and Docker's
# HEALTHCHECK is ignored there.

# -- builder: a wheel of recoveryd, and a venv with it, its dependencies and torch
FROM python:3.11-slim AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

# torch first, from its variant's index: the largest layer, rebuilt only when
# these arguments change. With it installed, torchft's torch requirement is
# met and pip does not fetch another build from PyPI.
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md constraints-dev.txt ./
COPY recoveryd/ recoveryd/

# The project's tested pins (constraints-dev.txt) for every dependency but
# torch, whose version TORCH_VERSION sets.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && grep -v '^torch==' constraints-dev.txt > /tmp/constraints.txt \
    && pip install --constraint /tmp/constraints.txt /wheels/recoveryd-*.whl \
    && recoveryd --help > /dev/null

# -- the image: the venv on a clean base, run as a non-root user under tini
FROM python:3.11-slim

LABEL org.opencontainers.image.title="recoveryd" \
      org.opencontainers.image.description="Live peer-to-peer state recovery for PyTorch training: coordinator and agent" \
      org.opencontainers.image.licenses="BSD-3-Clause"

# tini as PID 1 forwards SIGTERM to recoveryd (the coordinator drains on it)
# and reaps the processes torch's workers leave behind.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 recoveryd \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin recoveryd

COPY --from=builder /opt/venv /opt/venv

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /home/recoveryd
USER 10001

# Coordinator: gRPC 29400, /metrics 9400. Agent (in a trainer built on this
# image): rendezvous store 29401 (RECOVERYD_RENDEZVOUS_PORT), /metrics 9401
# (RECOVERYD_METRICS_PORT).
EXPOSE 29400 9400 29401 9401

ENTRYPOINT ["/usr/bin/tini", "--", "recoveryd"]
CMD ["coordinator"]

# syntax=docker/dockerfile:1.7
# Every llmp image, one per component, from this one file: the COMPONENT build argument says which.
#   docker build --build-arg COMPONENT=dataset -t llmp/dataset:0.1.0 .     (from the repository root)
# COMPONENT: gateway (REST, 8080), dataset (gRPC 50051), training (gRPC 50052; also the GPU training
# worker's image), registry (gRPC 50053), inference (gRPC 50054). docker-compose.yml and deploy/ build
# and use these images. Each installs deploy/locks/$COMPONENT.lock: the part of requirements.lock its
# code needs (scripts/gen_runtime_lock.py derives it from the component's imports), so the gateway,
# dataset and inference images carry no torch, and no image carries a test or benchmark package.

# Pinned base: the same Debian release and CPython patch version in both stages, so the virtual
# environment copied from `build` finds its interpreter at the same path in `runtime`.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm
ARG COMPONENT=gateway

# ---- build: one virtual environment with the component's locked dependencies, then llmp itself ------
FROM ${PYTHON_IMAGE} AS build
ARG COMPONENT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/locks/${COMPONENT}.lock ./component.lock
# Everything but torch without resolving (the lock is complete). torch, where the component needs it:
# the training image (which runs torchrun on the GPU) gets PyPI's CUDA build, installed *with* its
# dependencies constrained by the lock, which adds only the CUDA runtime wheels (nvidia-*) it pins
# exactly (the NVIDIA container toolkit provides the driver at run time); the registry (ONNX export on
# CPU) gets PyTorch's CPU build at the same version, without several GB of CUDA libraries.
RUN grep -v '^torch==' component.lock > /tmp/without-torch.lock \
 && pip install --no-deps -r /tmp/without-torch.lock \
 && torch="$(sed -n 's/^torch==//p' component.lock)" \
 && if [ -z "$torch" ]; then echo "the ${COMPONENT} image has no torch"; \
    elif [ "${COMPONENT}" = training ]; then pip install -c component.lock "torch==$torch"; \
    else pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==$torch+cpu"; fi
COPY pyproject.toml README.md ./
COPY services ./services
COPY gateway ./gateway
COPY cli ./cli
COPY gen ./gen
# A regular (not editable) install: the runtime stage needs /opt/venv only, not /src. Then the
# component's entry module and the healthcheck must import from what was installed.
RUN pip install --no-deps --no-build-isolation . \
 && case "${COMPONENT}" in gateway) entry=gateway.server ;; training) entry=services.training.worker ;; \
      *) entry="services.${COMPONENT}.server" ;; esac \
 && python -c "import ${entry}, services.common.healthcheck"

# ---- runtime: the virtual environment, a non-root user, nothing else ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 llmp \
 && useradd --system --uid 10001 --gid llmp --home-dir /var/lib/llmp --create-home --shell /usr/sbin/nologin llmp
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLMP_BIND_HOST=0.0.0.0 \
    LLMP_STATE_DIR=/var/lib/llmp
WORKDIR /var/lib/llmp
USER 10001:10001
# SIGTERM starts the graceful shutdown (NOT_SERVING, drain in-flight calls, stop).
STOPSIGNAL SIGTERM

# ---- what each component runs, listens on and is checked by --------------------------------------
# Healthy: GET /healthz answers 2xx (liveness; /readyz: this process can serve; /v1/status: backends).
FROM runtime AS gateway
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "http://127.0.0.1:8080/healthz"]
CMD ["python", "-m", "gateway.server"]

# Healthy (each gRPC service): the gRPC health service answers SERVING.
FROM runtime AS dataset
EXPOSE 50051 9151
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "127.0.0.1:50051"]
CMD ["python", "-m", "services.dataset.server"]

# The coordinator by default; the GPU worker runs the same image with
# `celery --app services.training.worker worker --queues gpu,eval` (docker-compose.yml, deploy/).
FROM runtime AS training
EXPOSE 50052 9152
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "127.0.0.1:50052"]
CMD ["python", "-m", "services.training.server"]

FROM runtime AS registry
EXPOSE 50053 9153
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "127.0.0.1:50053"]
CMD ["python", "-m", "services.registry.server"]

FROM runtime AS inference
EXPOSE 50054 9154
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "127.0.0.1:50054"]
CMD ["python", "-m", "services.inference.server"]

# The image built: the stage COMPONENT names.
FROM ${COMPONENT}

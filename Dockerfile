# syntax=docker/dockerfile:1
# resnet-serve: CPU image by default. For NVIDIA GPUs build with the CUDA wheels instead:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 -t resnet-serve:cuda .
# (the CUDA runtime comes inside the wheels; the host needs the NVIDIA driver and container toolkit).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX}" torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Install this project (its dependencies are pinned or bounded in pyproject.toml), then fetch the
# official weights once, verified against the hash in their name, so the image runs offline.
# The build fails here if they cannot be had.
# hadolint ignore=DL3013
RUN pip install ".[int8]" \
 && resnet-serve download-weights --dir /opt/weights

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/weights /opt/weights
ENV PATH=/opt/venv/bin:$PATH \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_WEIGHTS_DIR=/opt/weights \
    RESNET_SERVE_WEIGHTS_MODE=official \
    RESNET_SERVE_ALLOW_DOWNLOAD=false \
    RESNET_SERVE_LOG_FORMAT=json
USER 10001
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["resnet-serve", "serve"]

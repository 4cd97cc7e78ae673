# resnet-serve images. Targets:
#   slim  (default)  the torch-free server: ONNX Runtime, a model repository baked in at /models;
#                    with SLIM_EXTRAS=openvino, OpenVINO too (the faster INT8 on Intel CPUs with AMX)
#   torch            the TorchScript server (CPU torch by default)
#   load             locust with our locustfile, for docker compose's "load" profile
#
#   docker build -t resnet-serve:slim .
#   docker build --build-arg SLIM_EXTRAS=openvino --build-arg SLIM_RUNTIME=openvino -t resnet-serve:openvino .
#   docker build --target torch -t resnet-serve:torch .
#   docker run --network host -e RESNET_SERVE_PORT=8000 resnet-serve:slim
#   docker run -v $PWD/models:/models:ro -p 8000:8000 resnet-serve:slim   # your repository instead
#
# Build arguments:
#   BASE       the Python base image (python:3.11-slim; `make docker-check` builds a stand-in
#              from Debian where Docker Hub is out of reach)
#   MODELS     export (default): the repositories are exported in a builder stage with the torch
#              extra; context: copied from build/docker/models/{slim,torch}, exported beforehand
#              (`make docker-check` does it with the host's full install)
#   WEIGHTS    official (default: downloaded and hash-checked while building) or random (loudly:
#              predictions are meaningless; for places that cannot download the official file)
#   SLIM_PRECISIONS   the ONNX artefacts baked into slim: int8 (default: the smallest image and
#              footprint; the image serves INT8) or fp32,int8 (then RESNET_SERVE_PRECISION picks)
#   TORCH_PRECISIONS  the TorchScript artefacts baked into torch: fp32,int8 (add fp16 for CUDA)
#   SLIM_EXTRAS  extras of the slim install: none (default), openvino (OpenVINO's CPU plugin and
#              its ONNX reader only: its GPU and NPU plugins and other model readers are left out),
#              heif (HEIC uploads; pillow-heif's wheels are GPLv2), or both as openvino,heif
#   SLIM_RUNTIME the slim image's RESNET_SERVE_RUNTIME: onnxruntime (default), openvino, or auto
#              (times both at each container start, as the compiled-model cache starts empty)
#   TORCH_INDEX  where torch comes from: PyTorch's CPU wheels by default; for NVIDIA GPUs
#              https://download.pytorch.org/whl/cu130 (the CUDA runtime comes inside the wheels; the
#              host needs the driver and the container toolkit)
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS / PIP_TRUSTED_HOST: pip's settings for
#              the build stages only; nothing of them stays in an image. A CA bundle for the
#              indexes comes as a BuildKit secret: --secret id=pip_cert,src=/path/to/ca.pem
#
# Layers are few on purpose: a storage driver like vfs copies every layer whole, and the torch
# virtualenv is gigabytes.
ARG BASE=python:3.11-slim
ARG MODELS=export

# --- The full install (torch): it exports the repository, and it is the torch image's venv.
FROM ${BASE} AS torch-env
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
COPY pyproject.toml README.md /src/
COPY src /src/src
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_cert \
    python3 -m venv /opt/venv \
 && if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:+$PIP_EXTRA_INDEX_URL }${TORCH_INDEX}" \
    /opt/venv/bin/pip install --no-cache-dir "/src[torch]" \
 && rm -rf /src

# Each image gets a repository holding what it serves: slim the ONNX artefacts, torch TorchScript
# and the FP32 state_dict that explanations (POST /explain) load.
FROM torch-env AS models-export
ARG WEIGHTS=official
ARG SLIM_PRECISIONS=int8
ARG TORCH_PRECISIONS=fp32,int8
RUN /opt/venv/bin/resnet-serve export --weights "${WEIGHTS}" --repository /models/slim \
        --format onnx --precision "${SLIM_PRECISIONS}" \
 && /opt/venv/bin/resnet-serve export --weights "${WEIGHTS}" --repository /models/torch \
        --format torchscript,state_dict --precision "${TORCH_PRECISIONS}"

FROM ${BASE} AS models-context
COPY build/docker/models /models

# hadolint ignore=DL3006
FROM models-${MODELS} AS models

# --- The slim install: no torch.
FROM ${BASE} AS slim-env
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG SLIM_EXTRAS=
COPY pyproject.toml README.md /src/
COPY src /src/src
# pip itself and what only exporting uses (ONNX Runtime's quantization and tools) leave the image;
# of OpenVINO, what serving an ONNX file on the CPU never loads (GPU and NPU plugins, the GPU's
# kernel cache, readers of other model formats).
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_cert \
    python3 -m venv /opt/venv \
 && if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/venv/bin/pip install --no-cache-dir "/src${SLIM_EXTRAS:+[$SLIM_EXTRAS]}" \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
 && site=$(echo /opt/venv/lib/python3*/site-packages) \
 && rm -rf /src "$site/onnxruntime/transformers" "$site/onnxruntime/tools" "$site/onnxruntime/quantization" \
    "$site"/openvino/libs/libopenvino_intel_gpu_plugin.so "$site"/openvino/libs/libopenvino_intel_npu_plugin.so \
    "$site"/openvino/libs/cache.json "$site"/openvino/libs/libopenvino_*tensorflow*_frontend.so* \
    "$site"/openvino/libs/libopenvino_paddle_frontend.so* "$site"/openvino/libs/libopenvino_pytorch_frontend.so* \
    "$site"/openvino/libs/libopenvino_jax_frontend.so* "$site"/openvino/libs/libopenvino_gguf_frontend.so* \
 && find /opt/venv/lib -type d -name tests -prune -exec rm -rf {} +

# --- A load generator for docker compose's "load" profile: locust and our locustfile.
FROM ${BASE} AS load
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
COPY benchmarks/locustfile.py benchmarks/images.py /bench/
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_cert \
    python3 -m venv /opt/venv \
 && if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/venv/bin/pip install --no-cache-dir "locust>=2.20" \
 && useradd --create-home --uid 10001 app
ENV PATH=/opt/venv/bin:$PATH
USER 10001
WORKDIR /home/app
ENTRYPOINT ["locust", "-f", "/bench/locustfile.py"]

# --- The torch image: TorchScript; the models first, the venv last (the largest layer).
FROM ${BASE} AS torch
RUN useradd --create-home --uid 10001 app
COPY --from=models /models/torch /models
COPY --from=torch-env /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_MODEL_REPOSITORY=/models \
    RESNET_SERVE_RUNTIME=torchscript \
    RESNET_SERVE_LOG_FORMAT=json
USER 10001
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=3s --timeout=2s --start-period=120s --retries=3 \
  CMD ["python3", "-I", "-S", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RESNET_SERVE_PORT', '8000') + '/health/ready', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["resnet-serve", "serve"]

# --- The slim image (the default target): ONNX Runtime, or what SLIM_RUNTIME names.
FROM ${BASE} AS slim
ARG SLIM_RUNTIME=onnxruntime
RUN useradd --create-home --uid 10001 app
COPY --from=models /models/slim /models
COPY --from=slim-env /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_MODEL_REPOSITORY=/models \
    RESNET_SERVE_RUNTIME=${SLIM_RUNTIME} \
    RESNET_SERVE_PRECISION=int8 \
    RESNET_SERVE_LOG_FORMAT=json
USER 10001
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=2s --timeout=2s --start-period=60s --retries=3 \
  CMD ["python3", "-I", "-S", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RESNET_SERVE_PORT', '8000') + '/health/ready', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["resnet-serve", "serve"]

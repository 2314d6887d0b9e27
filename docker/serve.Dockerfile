# The serving image (docker-compose.yml's `triton`): NVIDIA's Triton container with tritonasr[server].
# No torch, NeMo, FunASR or Locust: the export job and the load generators have their own images
# (docker/export.Dockerfile, docker/loadtest.Dockerfile).
#
# NVIDIA's Triton container, pinned. It must be 24.12 or newer: older servers crash when gRPC
# requests are cancelled (triton-inference-server/server#7368), and a live caller hanging up on
# `asr_stream` cancels its decoupled stream. 25.01 is Triton 2.54 on Ubuntu 24.04 (Python 3.12,
# CUDA 12, cuDNN 9); its native ONNX Runtime backend is ONNX Runtime 1.20.1.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.01-py3
ARG PYTHON_IMAGE=python:3.12-slim

# The project's wheel, built from the checkout (the build context); the same stage in every
# docker/*.Dockerfile. The wheel is pure Python and carries the model templates and speech as
# package data, so no checkout goes into the image.
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
RUN pip wheel --no-deps --wheel-dir /wheels /src

FROM ${TRITON_IMAGE}

# The Python backend's models (the BLS pipelines, parakeet_decoder, speaker_registry) run in the
# image's own Python, so the package goes there. The image already lets pip write to it.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    DEBIAN_FRONTEND=noninteractive

# tini, PID 1 on Kubernetes (deploy/kubernetes; compose's `init: true` brings its own): it reaps
# the model processes of a server the supervisor had to kill and passes SIGTERM to serve alone.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

COPY --from=wheel /wheels /tmp/wheels
RUN pip install "$(ls /tmp/wheels/tritonasr-*.whl)[server]" \
    && rm -rf /tmp/wheels

# The CPU onnxruntime that the resolver picked gives way to the GPU build: parakeet_decoder and
# the served front ends (Python-backend models) run ONNX Runtime's CUDA provider. Both install
# the same `onnxruntime` module, so the CPU one goes first. The default matches the image:
# CUDA 12 / cuDNN 9, and the same version as Triton's own ONNX Runtime backend.
ARG ONNXRUNTIME_GPU=onnxruntime-gpu==1.20.1
RUN pip uninstall -y onnxruntime \
    && pip install "${ONNXRUNTIME_GPU}" \
    && python3 -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())"

# The build fails if any of these can be imported: they belong to the other roles' images.
RUN python3 -c "import importlib.util, sys; \
    found = [m for m in ('torch', 'nemo', 'funasr', 'locust') if importlib.util.find_spec(m)]; \
    sys.exit(f'the serving image must not carry {found}' if found else 0)"

# Where the deployment's volumes go (docker-compose.yml): the served repository, and ONNX
# Runtime's TensorRT engine and timing caches.
RUN mkdir -p /models /cache/trt
ENV TRITONASR_MODEL_REPOSITORY=/models

# `tritonasr serve` runs this image's own tritonserver and backends (native ONNX Runtime and
# TensorRT), not the nvidia-pytriton wheel's.
ENV TRITONASR_TRITONSERVER=/opt/tritonserver/bin/tritonserver \
    TRITONASR_BACKEND_DIRECTORY=/opt/tritonserver/backends

# gRPC (TLS, API keys) for callers; the supervisor's health. docker-compose.yml says how.
EXPOSE 8001 8003
CMD ["tritonasr", "serve"]

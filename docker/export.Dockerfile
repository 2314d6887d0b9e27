# The export image (docker-compose.yml's `export`): docker/export.sh downloads the weights, exports
# the ONNX graphs (tritonasr[export]: torch, NeMo, FunASR), writes the served repository and
# builds its TensorRT plans with trtexec (`tritonasr repo plans`).
#
# Based on the serving image's Triton container, the same TRITON_IMAGE: a TensorRT plan only runs
# on the TensorRT version that built it, so trtexec must come from the TensorRT that serves. The
# container also has the CUDA 12 / cuDNN 9 libraries onnxruntime-gpu loads. NGC's PyTorch container
# would bring its own TensorRT release, and pip would replace its torch with the pinned one anyway.
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

ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    DEBIAN_FRONTEND=noninteractive

# trtexec is in the image but not on PATH.
ENV PATH=${PATH}:/usr/src/tensorrt/bin
RUN command -v trtexec

# torch is pinned to 2.13.0 in pyproject.toml; on Linux x86_64 PyPI serves its CUDA build, which
# the exports run on. The check fails the build if a CPU-only torch was installed.
COPY --from=wheel /wheels /tmp/wheels
RUN pip install "$(ls /tmp/wheels/tritonasr-*.whl)[export]" \
    && rm -rf /tmp/wheels \
    && python3 -c "import sys, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); \
        sys.exit(torch.version.cuda is None)"

# The CPU onnxruntime that the resolver picked gives way to the GPU build: the exports check
# their graphs on the GPU. Both install the same `onnxruntime` module, so the CPU one goes first.
# The default matches the image: CUDA 12 / cuDNN 9, and Triton's own ONNX Runtime version.
ARG ONNXRUNTIME_GPU=onnxruntime-gpu==1.20.1
RUN pip uninstall -y onnxruntime \
    && pip install "${ONNXRUNTIME_GPU}" \
    && python3 -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())"

# The job's script (docker-compose.yml runs it; so does a bare `docker run`).
COPY docker/export.sh /opt/tritonasr/export.sh

# Where the deployment's volumes go (docker-compose.yml): the exported graphs and the repository.
RUN mkdir -p /exports /models
ENV TRITONASR_MODEL_REPOSITORY=/models

CMD ["bash", "/opt/tritonasr/export.sh"]

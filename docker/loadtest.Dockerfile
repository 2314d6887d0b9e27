# The load-test image (docker-compose.yml's `locust-master`, `locust-worker`): Locust with
# tritonasr[loadtest] on a slim Python. The callers only speak gRPC to the server: no GPU, CUDA
# or Triton container needed.
ARG PYTHON_IMAGE=python:3.12-slim

# The project's wheel, built from the checkout (the build context); the same stage in every
# docker/*.Dockerfile. The wheel is pure Python and carries the model templates and speech as
# package data, so no checkout goes into the image.
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
RUN pip wheel --no-deps --wheel-dir /wheels /src

FROM ${PYTHON_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

COPY --from=wheel /wheels /tmp/wheels
RUN pip install "$(ls /tmp/wheels/tritonasr-*.whl)[loadtest]" \
    && rm -rf /tmp/wheels

# The locustfile ships in the package (tritonasr.loadtest.locustfile); `locust -f` takes a path,
# so it gets a fixed one. `--list` imports it and lists its users: the build fails if it cannot.
RUN mkdir -p /opt/tritonasr \
    && ln -s "$(python -c 'from importlib.util import find_spec; \
        print(find_spec("tritonasr.loadtest.locustfile").origin)')" /opt/tritonasr/locustfile.py \
    && locust -f /opt/tritonasr/locustfile.py --list

WORKDIR /results
CMD ["locust", "-f", "/opt/tritonasr/locustfile.py"]

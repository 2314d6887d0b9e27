# The gateway image (docker-compose.yml's `gateway`, the Helm chart's gateway pods): `tritonasr
# gateway` with tritonasr[gateway] on a slim Python. It speaks gRPC to Triton (a server or the
# balancer) and HTTP/WebSocket to callers: no GPU, CUDA or Triton container needed.
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
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# tini, PID 1: passes SIGTERM to the gateway, which then answers the requests in flight and
# finishes its job files before it stops.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

COPY --from=wheel /wheels /tmp/wheels
RUN pip install "$(ls /tmp/wheels/tritonasr-*.whl)[gateway]" \
    && rm -rf /tmp/wheels

# The build fails if any of these is there: they belong to the other roles' images (pytriton is
# the server extra's Triton; tritonserver, a Triton base image's).
RUN python3 -c "import importlib.util, shutil, sys; \
    found = [m for m in ('torch', 'nemo', 'funasr', 'locust', 'pytriton') if importlib.util.find_spec(m)] \
        + [b for b in ('tritonserver',) if shutil.which(b)]; \
    sys.exit(f'the gateway image must not carry {found}' if found else 0)"

# Audio libsndfile does not read (m4a/mp4, webm) goes through PyAV, whose wheels carry FFmpeg's
# libraries: no Debian ffmpeg. The build fails if the gateway does not import or PyAV lacks the
# AAC and Opus decoders.
RUN python3 -c "import tritonasr.gateway.app, av; [av.codec.Codec(c, 'r') for c in ('aac', 'opus')]"

# Not root: uid 1000, as the chart's pods run it. /var/lib/tritonasr holds a single gateway's
# SQLite jobs database (docker-compose.yml mounts a volume there); nothing else is written
# outside /tmp, so the root filesystem may be read-only.
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /var/lib/tritonasr --shell /usr/sbin/nologin \
        tritonasr \
    && mkdir -p /var/lib/tritonasr \
    && chown tritonasr:tritonasr /var/lib/tritonasr
USER 1000:1000
WORKDIR /var/lib/tritonasr

# HTTPS/WSS once given --tls-cert/--tls-key (compose and the chart mount a certificate and add
# them). Every address but loopback needs the callers' keys: $TRITONASR_API_KEY (comma-separated),
# else the gateway refuses to start. --url names Triton's gRPC HOST:PORT. 8082: its Prometheus
# metrics, once given --metrics-host (loopback by default; compose and the chart open it).
EXPOSE 8443 8082
ENTRYPOINT ["tini", "--"]
CMD ["tritonasr", "gateway", "--host=0.0.0.0", "--port=8443", "--jobs-db=/var/lib/tritonasr/jobs.db"]

# The web page and HTTP API (`stemserve web`, port 8000) for hosts without an NVIDIA GPU, like
# the demucs image's CPU variant. On its own it separates in-process with ONNX Runtime: the
# first job of a model downloads its checkpoint into the volume below and exports it once.
# With STEMSERVE_TRITON_URL set (the `web-cpu` service of docker-compose.yml) it sends the
# work to that Triton server over gRPC instead.
#
#   docker build -f docker/cpu.Dockerfile -t stemserve-web-cpu .
#   docker run -p 8000:8000 -v checkpoints:/root/.cache/torch/hub/checkpoints stemserve-web-cpu
FROM python:3.11-slim

# The in-process fallback exports checkpoints with PyTorch: its CPU wheels spare gigabytes.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    STEMSERVE_CACHE=/data/cache

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stemserve stemserve
COPY client client
COPY export export
COPY model_repository model_repository
RUN pip install --extra-index-url "$TORCH_INDEX" ".[web,onnx,export]" && rm -rf /src

# Jobs (uploads and stems) and exports (stemserve's cache: /data/cache/export/<model>) live
# under /data.
WORKDIR /data
VOLUME ["/root/.cache/torch/hub/checkpoints", "/data"]
EXPOSE 8000
# The start period covers the default model's first download and export (about 2 minutes).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/config', timeout=4)"]
CMD ["stemserve", "web", "--host", "0.0.0.0", "--port", "8000", "--jobs-dir", "/data/jobs"]

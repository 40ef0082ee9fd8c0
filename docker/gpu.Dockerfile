# The web page and HTTP API (`stemserve web`, port 8000) of the GPU stack, like the demucs
# image's GPU variant: the network runs on the GPUs in the `triton` service (NGC Triton with
# ONNX Runtime and TensorRT), and this image talks to it over gRPC. It needs no CUDA, no
# PyTorch and no ONNX Runtime of its own, so it stays small; the `web` service of
# docker-compose.yml runs it with STEMSERVE_TRITON_URL=triton:8001.
#
#   docker build -f docker/gpu.Dockerfile -t stemserve-web-gpu .
#   docker run -p 8000:8000 -e STEMSERVE_TRITON_URL=triton-host:8001 stemserve-web-gpu
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    STEMSERVE_TRITON_URL=triton:8001

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stemserve stemserve
COPY client client
COPY export export
COPY model_repository model_repository
RUN pip install ".[web]" && rm -rf /src

# Jobs (uploads and stems) live under /data. The checkpoints volume is the demucs image's
# and the export service's: mounted here too, so one `docker run` line fits both images.
WORKDIR /data
VOLUME ["/root/.cache/torch/hub/checkpoints", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/config', timeout=4)"]
CMD ["stemserve", "web", "--host", "0.0.0.0", "--port", "8000", "--jobs-dir", "/data/jobs"]

# The one-shot `export` service of docker-compose.yml: downloads a Demucs v2 checkpoint,
# exports it to ONNX and fills the Triton model repositories. Runs on the CPU.
FROM python:3.11-slim

# The export runs on the CPU: torch's CPU wheels spare gigabytes of CUDA libraries.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stemserve stemserve
COPY client client
COPY export export
COPY model_repository model_repository
RUN pip install --extra-index-url "$TORCH_INDEX" ".[export]" && rm -rf /src

WORKDIR /work
CMD ["stemserve", "--help"]

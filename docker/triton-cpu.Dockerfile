# Triton for hosts without an NVIDIA GPU (the `triton-cpu` service of docker-compose.yml):
# the NGC image's python backend runs model_repository/cpu/demucs/1/model.py, which needs
# ONNX Runtime and stemserve's sidecar reader in the image's own python3. Same server release
# (2.51 = 24.10) as the local server of the nvidia-pytriton wheel.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# numpy 1.x: what this release's python backend stub was built with.
RUN pip install "onnxruntime>=1.20" "numpy<2"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stemserve stemserve
COPY client client
COPY export export
COPY model_repository model_repository
# model.py imports only stemserve.spec and stemserve.runtime (numpy and onnxruntime, installed
# above; OpenVINO only for a bf16 repository, which this image does not serve): no need for
# the client's dependencies.
RUN pip install --no-deps . && rm -rf /src
WORKDIR /opt/tritonserver

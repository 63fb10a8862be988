# Challenge container for a mipseg model (documentation/ship.md). Build context: this repository,
# with the model package exported by `mipseg_export_model -d ID -o model.zip` placed at ./model.zip.
#
#   CPU:  docker build -t mipseg-challenge .
#   CUDA: docker build -t mipseg-challenge \
#           --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#           --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 --build-arg EXTRAS= .
#   run:  docker run --rm --gpus all -v $PWD/in:/input/images:ro -v $PWD/out:/output/images mipseg-challenge
#
# Not built on the machine that wrote it (no docker there); the entry script is tested on folders.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.4.1

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# the CUDA base images carry no Python; the python image already has it (apt is then a no-op install)
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md /opt/mipseg/src/
COPY mipseg /opt/mipseg/src/mipseg
# OpenVINO runs CPU prediction with 5-7x less CPU time per tile (documentation/performance.md); a CUDA
# image does not use it: --build-arg EXTRAS= leaves it out
ARG EXTRAS=openvino
RUN if [ -n "${EXTRAS}" ]; then pip install "/opt/mipseg/src[${EXTRAS}]"; else pip install /opt/mipseg/src; fi

COPY model.zip /opt/mipseg/model.zip
COPY container/entrypoint.py /opt/mipseg/entrypoint.py
# fail the build, not the submission, on a bad package (checksums, version, missing checkpoint)
RUN python -c "from mipseg.inference.model_package import read_manifest; \
print(read_manifest('/opt/mipseg/model.zip')['models'])"

# challenge platforms run the container as an unprivileged user without network
RUN useradd --create-home --uid 1001 user
USER user
ENV MIPSEG_CACHE=/tmp/mipseg_cache
ENTRYPOINT ["python", "/opt/mipseg/entrypoint.py"]

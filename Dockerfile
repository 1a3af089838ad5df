# fusedopt on an NVIDIA GPU: the default command runs the test suite on the GPU, then
# the benchmark, and writes the records (JSON, Markdown, PNG) to /results.
#
#   docker build -t fusedopt .
#   docker run --gpus all --rm -v "$PWD/bench/results:/results" fusedopt
#
# For CUDA 13 drivers: --build-arg CUDA_IMAGE=13.0.0-runtime-ubuntu24.04
#                      --build-arg CUPY_EXTRA=cuda13
ARG CUDA_IMAGE=12.8.1-runtime-ubuntu24.04
FROM nvidia/cuda:${CUDA_IMAGE}

ARG CUPY_EXTRA=cuda12
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fusedopt
COPY setup.py pyproject.toml README.md ./
COPY bench/constraints.txt ./bench/
COPY fusedopt ./fusedopt
COPY kernels ./kernels
# The cuda12/cuda13 extra brings NVRTC with cuda-bindings (fusedopt compiles its
# kernels with them) and the CUDA runtime headers CuPy's own kernels need.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install -c bench/constraints.txt ".[${CUPY_EXTRA},test,bench]"
COPY tests ./tests
COPY bench ./bench

CMD ["bash", "bench/run_gpu.sh", "/results"]

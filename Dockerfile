# CSDM-LT: long-tailed dataset distillation, in an image with the tested Python and torch.
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t csdm .
#   docker run --gpus all -v "$PWD/data:/workspace/csdm/data" -v "$PWD/runs:/workspace/csdm/runs" \
#     -v csdm-cache:/workspace/cache csdm ./run_all.sh
#
# data/ holds the downloaded CIFAR (torchvision downloads there when no --data-dir is given), runs/ the
# runs (run_all.sh's default --out), and the named volume csdm-cache the decoded splits (CSDM_CACHE_DIR) and torch.compile's kernels, so
# a second container neither downloads, decodes nor compiles again. GIT_COMMIT names the commit in every run
# record (the image has no .git). Tests of this file, without a Docker engine: tests/test_docker.py.
#
# The image runs the Python, torch and torchvision that CI tests (requirements.txt pins them): a plain Python
# base, and torch from PyPI, whose Linux wheels bring their own CUDA 13.0 libraries (the host needs an NVIDIA
# driver of version 580 or newer; `docker run --gpus all` maps the driver in). A pytorch/pytorch base would
# carry another torch (2.7.1 on the last one used) that pip would replace anyway.
FROM python:3.11.7-slim-bookworm

# run_all.sh passes --compile to every script: torch.compile needs a C/C++ compiler on first use (Inductor
# builds C++ kernels on the CPU; on CUDA Triton builds its launcher with gcc), and the -runtime base has
# none. build-essential (gcc, g++, libc headers; ~250 MB).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /workspace/csdm

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

ENV CSDM_CACHE_DIR=/workspace/cache \
    TORCHINDUCTOR_CACHE_DIR=/workspace/cache/torchinductor \
    TRITON_CACHE_DIR=/workspace/cache/triton
VOLUME ["/workspace/csdm/data", "/workspace/csdm/runs", "/workspace/cache"]

# every module (so a new one is never left out) and the script; last, so that a code change rebuilds
# only this layer
COPY *.py run_all.sh ./

# late, so that a new commit does not invalidate the layers above
ARG GIT_COMMIT=unknown
ENV CSDM_GIT_COMMIT=$GIT_COMMIT
CMD ["./run_all.sh"]

# CSDM-LT: long-tailed dataset distillation, on a CUDA PyTorch image.
#   docker build -t csdm .
#   docker run --gpus all -v "$PWD/results:/workspace/csdm/results" csdm ./run_all.sh
# The base image carries torch 2.7.1 and torchvision 0.22.1 (CUDA 12.6), inside requirements.txt's ranges,
# so pip adds only what is missing.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /workspace/csdm

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY data_lt.py networks.py sdd.py distill.py evaluate.py run_all.sh ./
CMD ["./run_all.sh"]

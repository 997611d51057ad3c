# bn_triton on any CUDA machine: docker build -t bn_triton . && docker run --rm --gpus all bn_triton
#
# A PyTorch *devel* image: Triton compiles its kernels at run time and needs a C compiler, the CUDA
# toolkit and the Python headers, which the runtime images lack. CUDA 12.8 covers Hopper and
# Blackwell (host driver >= 570). The torch/triton pins below are the versions this image ships
# (torch 2.9.1 pairs with triton 3.5.1); tests/test_packaging.py checks that they agree with the
# base image's tag and satisfy the requirements in pyproject.toml.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel

ARG TORCH_VERSION=2.9.1
ARG TRITON_VERSION=3.5.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/bn_triton

# The pins go into a constraints file so that installing the package and its extras can never
# replace the image's CUDA build of torch (or its triton) with another one from PyPI.
RUN printf 'torch==%s\ntriton==%s\n' "${TORCH_VERSION}" "${TRITON_VERSION}" > /etc/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

COPY . .
# Editable, as in development: tests and `python -m bench` run from this checkout, and the repo's
# kernels/ folder is importable as bn_triton.kernels.
RUN pip install --no-cache-dir -e ".[test,bench]" \
    && python -c "import torch, triton, bn_triton; print('torch', torch.__version__, 'triton', triton.__version__, 'bn_triton', bn_triton.__version__)"

# Default: the test suite, on the GPU (tests/conftest.py only turns on the interpreter without one).
#   docker run --rm --gpus all bn_triton
#   docker run --rm --gpus all bn_triton python -m bn_triton
#   docker run --rm --gpus all -v "$PWD/results:/results" bn_triton python -m bench --quick --out /results
CMD ["python", "-m", "pytest", "-q"]

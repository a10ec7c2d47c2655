# MedMaaS image: the same image runs migrate, web, workers and beat (see docker-compose.yml).
#
#   CPU image (default):   docker build -t medmaas:latest .
#   GPU image (CUDA torch): docker build -t medmaas-gpu:latest --build-arg TORCH_VARIANT=cu128 .
#
# torch is installed first, pinned, from the PyTorch index of the chosen variant, so that
# `pip install .` (which only asks for torch>=2.3) never pulls a different multi-GB build.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA variant the PyTorch index publishes for TORCH_VERSION (e.g. cu126, cu128, cu130)
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_BASE=https://download.pytorch.org/whl

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEDMAAS_HOME=/data/medmaas \
    MEDMAAS_ARTIFACT_ROOT=/data/artifacts \
    MEDMAAS_WEB_HOST=0.0.0.0 \
    MEDMAAS_WEB_PORT=5000

# libgomp1: OpenMP for torch/scikit-learn CPU kernels; libxrender1/libxext6: RDKit drawing.
# (Debian's security updates are wanted here, so no exact apt versions.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libxrender1 libxext6 \
 && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX_BASE}/${TORCH_VARIANT}" "torch==${TORCH_VERSION}" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /opt/medmaas
# The pin stays in force for everything installed after it (2.13.0+cpu satisfies ==2.13.0).
RUN echo "torch==${TORCH_VERSION}" > /etc/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

# Dependencies change less often than code: install them in their own layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY . .
RUN pip install . \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__" \
 && medmaas --help > /dev/null \
 && rm -rf /opt/medmaas/build

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin medmaas \
 && mkdir -p /data/medmaas /data/artifacts \
 && chown -R medmaas:medmaas /data
USER 10001:10001
WORKDIR /data
VOLUME ["/data/artifacts"]
EXPOSE 5000

# docker-compose.yml runs each process with its own full command line (medmaas worker ...).
CMD ["medmaas", "web"]

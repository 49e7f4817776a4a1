# The image every Kubeflow step runs in: increc installed over the pinned TFX 1.16 stack.
#   docker build -t REGISTRY/increc:TAG .
#   increc compile --target kubeflow --image REGISTRY/increc:TAG --work gs://BUCKET/work --data gs://BUCKET/data
FROM python:3.10-slim

ENV TF_USE_LEGACY_KERAS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/increc
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline ./pipeline
COPY components ./components
COPY models ./models
COPY serving ./serving

RUN pip install --upgrade pip \
 && pip install -c constraints.txt .

# The KubeflowV2DagRunner sets each step's command to TFX's container entrypoint.
ENTRYPOINT []

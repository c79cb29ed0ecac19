# One image for the gateway and the worker (different commands), plus a slim gateway-only target.
#   docker build -t dae-service .                      # full image: gateway + worker (TensorFlow CPU)
#   docker build --target gateway -t dae-gateway .     # gateway only: onnxruntime, no TensorFlow
FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 DAE_STORE_DIR=/data/store
RUN groupadd --system --gid 10001 dae && useradd --system --uid 10001 --gid dae --home-dir /app dae

# ---- dependencies, built in throw-away stages so the runtime images carry no build tools or caches
FROM base AS deps-full
COPY requirements.txt /tmp/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install -r /tmp/requirements.txt

FROM base AS deps-gateway
COPY requirements-gateway.txt /tmp/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install -r /tmp/requirements-gateway.txt

# ---- slim gateway: serves ONNX models, never imports TensorFlow
FROM base AS gateway
COPY --from=deps-gateway /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY dae/ dae/
COPY core/ core/
COPY service/ service/
RUN mkdir -p /data/store && chown -R dae:dae /data
USER dae
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]

# ---- full image (default target): gateway and worker, TensorFlow CPU, offline Fashion-MNIST
FROM base AS full
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
COPY --from=deps-full /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY dae/ dae/
COPY core/ core/
COPY service/ service/
COPY worker/ worker/
RUN mkdir -p /data/store && chown -R dae:dae /data
USER dae
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]

# One Dockerfile for every service. EXTRAS picks what the image carries:
#   EXTRAS=ingestion,feature,trainer,postgres  -> the image for ingestion, feature and trainer
#   EXTRAS=inference                           -> the inference image, without PyTorch
# The command chooses the service: python -m services.<name>.

FROM python:3.11-slim AS protos
WORKDIR /src
RUN pip install --no-cache-dir "grpcio-tools>=1.85,<2"
COPY protos/ protos/
RUN mkdir -p freshrec/v1 && python -m grpc_tools.protoc -Iprotos \
      --python_out=. --pyi_out=. --grpc_python_out=. protos/freshrec/v1/*.proto

FROM python:3.11-slim AS runtime
ARG EXTRAS=ingestion,feature,trainer,postgres
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/ services/
COPY cli/ cli/
COPY --from=protos /src/freshrec/ freshrec/
# torch==2.13.0 is pinned in pyproject.toml (trainer extra): the CPU wheel, not a CUDA build.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[${EXTRAS}]"
RUN useradd --create-home --uid 10001 freshrec && mkdir -p /data && chown freshrec /data
USER freshrec
VOLUME ["/data"]
CMD ["python", "-m", "services.ingestion"]

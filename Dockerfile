# One Dockerfile for every service; EXTRAS picks what an image carries:
#   EXTRAS=ingestion,feature,trainer,postgres,cli  -> freshrec:latest (ingestion, feature, trainer, migrate)
#   EXTRAS=inference                               -> freshrec-inference:latest, without PyTorch
# The command chooses the service: python -m services.<name> (or `freshrec db upgrade`).

# Stage 1: generate the protobuf code from the contract.
FROM python:3.11-slim AS protos
WORKDIR /src
RUN pip install --no-cache-dir "grpcio-tools>=1.85,<2"
COPY protos/ protos/
RUN mkdir -p freshrec/v1 && python -m grpc_tools.protoc -Iprotos \
      --python_out=. --pyi_out=. --grpc_python_out=. protos/freshrec/v1/*.proto

# Stage 2: install the project and its extras into a virtual environment.
FROM python:3.11-slim AS build
ARG EXTRAS=ingestion,feature,trainer,postgres,cli
WORKDIR /src
RUN python -m venv /opt/freshrec
COPY pyproject.toml README.md requirements.lock ./
COPY shared/ shared/
COPY services/ services/
COPY cli/ cli/
COPY --from=protos /src/freshrec/ freshrec/
# torch==2.13.0 is pinned in pyproject.toml (trainer extra): the CPU wheel, not a CUDA build.
# requirements.lock fixes every version to the ones the tests ran with (as `make install` does).
RUN /opt/freshrec/bin/pip install --no-cache-dir -c requirements.lock \
      --extra-index-url https://download.pytorch.org/whl/cpu ".[${EXTRAS}]"

# Stage 3: the runtime image: the environment and the sources, no compilers, not root.
FROM python:3.11-slim AS runtime
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/freshrec/bin:$PATH PYTHONPATH=/app
COPY --from=build /opt/freshrec /opt/freshrec
COPY --from=build /src /app
RUN useradd --create-home --uid 10001 freshrec && mkdir -p /data /models && chown freshrec /data /models
USER freshrec
VOLUME ["/data"]
CMD ["python", "-m", "services.ingestion"]

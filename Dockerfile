# meshflow workers and dashboard. The servers use the official `nats` image (see compose.yaml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY meshflow ./meshflow
COPY dashboard ./dashboard
COPY examples ./examples
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["meshflow"]
CMD ["worker", "examples:apps"]

# aggregator: Flask + Hypercorn. Build: docker build -t aggregator .
# (podman: podman build --format docker -t aggregator . -- its default OCI format drops HEALTHCHECK.)
# The demo, with no config: docker run -p 127.0.0.1:8000:8000 aggregator, then open
# http://127.0.0.1:8000/ (the demo upstreams run inside the container).
# Your config: docker run -p 8000:8000 -v $PWD/my.toml:/config.toml \
#   -e AGGREGATOR_CONFIG=/config.toml --stop-timeout 15 aggregator
# (--stop-timeout: longer than hypercorn.toml's graceful_timeout, so requests in flight finish.)
# Two replicas sharing Redis, with the demo upstreams: compose.yaml (docs/container.md).
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 app
WORKDIR /app

# Dependencies first (from pyproject.toml alone, with a stand-in README and package) so that
# changes to the code or the README do not reinstall them; at the versions the tests ran with.
COPY pyproject.toml constraints.txt ./
RUN mkdir aggregator && touch aggregator/__init__.py README.md \
    && pip install -c constraints.txt '.[fast]' && pip uninstall -y aggregator \
    && rm -rf aggregator build README.md

COPY aggregator ./aggregator
COPY README.md asgi.py hypercorn.toml ./
RUN pip install --no-deps . && rm -rf build

USER app
EXPOSE 8000
# Liveness, not readiness: Docker (and Swarm, which replaces unhealthy tasks) should restart a
# process that no longer serves HTTP, not every replica at once because Redis is down (the app
# keeps answering uncached meanwhile). Route traffic with /readyz instead: a load balancer's
# health check or a Kubernetes readinessProbe (503 names the part that is not ready).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# Metrics: GET /metrics on port 8000 with the admin token (-e AGGREGATOR_ADMIN_TOKEN=...), or
# AGGREGATOR_METRICS=public. With more than one worker, also set PROMETHEUS_MULTIPROC_DIR to an
# empty directory the app user can write (a fresh tmpfs per start; README, "Metrics").
# `aggregator serve` (exec form, so SIGTERM reaches it and it drains gracefully) with the server
# settings of hypercorn.toml, listening on every interface. With no config it starts the demo
# upstreams inside the container and aggregates them, so `docker run -p 8000:8000 IMAGE` answers
# /api/dashboard at once; mount a config and set AGGREGATOR_CONFIG to serve yours (no demo then),
# or set AGGREGATOR_DEMO_URL to use demo upstreams running elsewhere (compose.yaml does).
CMD ["aggregator", "serve", "--hypercorn-config", "hypercorn.toml", "--bind", "0.0.0.0:8000"]

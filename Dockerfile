# One image for every process of dnd-client: the command chooses the role.
#   dnd-client migrate up                  (one-shot, before the others)
#   celery -A worker worker                (the default command; scale freely)
#   celery -A worker beat                  (exactly one)
#   celery -A worker flower --port=5555    (refuses to start without FLOWER_BASIC_AUTH)
# No HEALTHCHECK here: each role has its own check, set where the role is chosen
# (docker-compose.yml, deploy/kubernetes). The image has what they need: Celery's
# `inspect ping` for workers, Python's urllib for Flower's /healthcheck.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user with a fixed UID (Kubernetes' runAsNonRoot checks a number),
# and /var/lib/dnd-client for beat's schedule state (BEAT_SCHEDULE_FILE): a new
# named volume mounted there takes this directory's owner.
RUN groupadd --system --gid 10001 dnd \
 && useradd --system --uid 10001 --gid dnd --home-dir /home/dnd --create-home \
        --shell /usr/sbin/nologin dnd \
 && install -d -o dnd -g dnd /var/lib/dnd-client

# Only what the package build needs (.dockerignore keeps the rest out). Every
# dependency ships binary wheels: no compiler or other build tool in the image.
COPY pyproject.toml README.md /tmp/src/
COPY worker /tmp/src/worker
COPY migrations /tmp/src/migrations
RUN pip install /tmp/src && rm -rf /tmp/src

USER dnd:dnd
# Not the source directory: `celery -A worker` loads the installed package.
WORKDIR /home/dnd
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]

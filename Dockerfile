# Self-hosted app or a Docker Space: `docker build -t lol-explorer . && docker run -p 7860:7860 lol-explorer`.
# Runs as UID 1000 (what Spaces use) on port 7860; the default zoo is ingested and its maps fitted at build time,
# so the container serves at once. The collection lives in $LOL_DATA_DIR (mount a volume there to keep uploads).
# The shipped predictors are inside the installed package; the default zoos are the repository's data/zoo.
# The image runs on CPU; to get a CPU-only torch wheel, pass your torch index with --build-arg PIP_EXTRA_INDEX_URL=…
FROM python:3.11-slim
RUN useradd -m -u 1000 user
USER 1000
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH \
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 GRADIO_ANALYTICS_ENABLED=False \
    LOL_DATA_DIR=/home/user/data LOL_ZOO_DIR=/home/user/app/data/zoo \
    NUMBA_CACHE_DIR=/home/user/.cache/numba PYTHONUNBUFFERED=1
ARG PIP_EXTRA_INDEX_URL=""
WORKDIR /home/user/app
COPY --chown=1000 requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY --chown=1000 . .
RUN pip install --no-cache-dir --no-deps . \
    && python -c "from app.serve import open_explorer; open_explorer(progress=False).close()"
EXPOSE 7860
CMD ["python", "space_app.py"]

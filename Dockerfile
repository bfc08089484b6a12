# Self-hosted app or a Docker Space: `docker build -t lol-explorer . && docker run -p 7860:7860 lol-explorer`.
# The image runs on CPU; to get a CPU-only torch wheel, pass your torch index with --build-arg PIP_EXTRA_INDEX_URL=…
FROM python:3.11-slim
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH \
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 NUMBA_CACHE_DIR=/home/user/.cache/numba PYTHONUNBUFFERED=1
ARG PIP_EXTRA_INDEX_URL=""
WORKDIR /home/user/app
COPY --chown=user requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY --chown=user . .
RUN pip install --no-cache-dir --no-deps .
EXPOSE 7860
CMD ["python", "space_app.py"]

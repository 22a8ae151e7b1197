# labelsmart on a CUDA 13 / cuDNN 9 runtime (what torch 2.14.1 and onnxruntime-gpu 1.31.1 are built for).
#   docker build -t labelsmart .
#   python -m labelsmart add-user --users users.json alice        # on the host, or in the image (below)
#   docker run --gpus all -p 7860:7860 -v /path/to/images:/data -v labelsmart-models:/app/models \
#       -v "$PWD/users.json:/app/users.json:ro" labelsmart --dataset /data --auth /app/users.json
# The container listens on all its interfaces, so the app asks for --auth (or an explicit --insecure).
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY app.py README.md ./
COPY labelsmart ./labelsmart
RUN mkdir -p models exports

EXPOSE 7860
# Listen on all interfaces inside the container (hence --auth USERS_FILE, or --insecure); publish the port only
# where you mean to.
ENTRYPOINT ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
CMD []

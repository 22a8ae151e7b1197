#!/usr/bin/env bash
# GPU checks, for a machine with an NVIDIA GPU and PyTorch already installed (the H100/H200 image of the
# device tool): installs the carried packages, trains on CUDA through the trainer's code and exports,
# times ONNX Runtime (CUDA provider) against PyTorch on CUDA, times `preannotate` end to end, runs the
# label-efficiency benchmark with a GPU budget and a short annotation loop, and with LS_CPU=1 the CPU numbers
# on two pinned cores.
#
#   bash scripts/gpu_check.sh DATA OUT
#
# DATA holds camvid/ in the shared layout (a copy of ../shared/data/camvid); OUT receives the log and the
# result files. Carried packages: wheels in .whl/ (segmentation_models_pytorch, pycocotools) and
# onnxruntime-gpu as an xz'd tar split in parts, already gathered in $SCRATCH/ortc/ (it is larger than one
# transfer; SCRATCH is $LS_SCRATCH, else $TMPDIR, else the system's temporary folder). Each stage has its
# own time limit, and a failing stage does not stop the next.
# Knobs: LS_SERVE=0 skips serving and pre-annotation (measured in BENCHMARKS.md already), LS_LE=0 the
# label-efficiency stages (issue 13: input-bound training with and without train.device_augment, then contrastive
# against CE at a GPU budget, with and without self-supervised pretraining), LS_LOOP=0 the short annotation loop
# (issue 12: steps per second and time to the first pre-annotation on the GPU), LS_CPU=1 adds the CPU stage.
# For a dry run on a CPU machine: LS_DEVICE=cpu LS_STEPS=4 LS_QUICK=1 LS_LE_ARGS="--n-labeled 2 --steps 2"
# LS_SPEED_ARGS="--steps 2" LS_SSL_ARGS="--ssl-steps 2" LS_LOOP_ARGS="--images 2 --seconds-per-image 5".
set -uo pipefail
DATA=${1:?usage: gpu_check.sh DATA OUT}
OUT=${2:?usage: gpu_check.sh DATA OUT}
DEVICE=${LS_DEVICE:-cuda}
STEPS=${LS_STEPS:-300}
LE_ARGS=${LS_LE_ARGS:---n-labeled 5,20 --minutes 1}
SPEED_ARGS=${LS_SPEED_ARGS:---minutes 0.5}
SSL_ARGS=${LS_SSL_ARGS:---ssl-minutes 1}
LOOP_ARGS=${LS_LOOP_ARGS:---images 10 --seconds-per-image 10}
QUICK=${LS_QUICK:-0}
R30=30; R15=15; [ "$QUICK" = 1 ] && R30=2 && R15=2
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
SCRATCH=${LS_SCRATCH:-${TMPDIR:-/tmp}}
export PYTHONPATH="$SCRATCH/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
stage() { echo; echo "=== [$(($(date +%s) - T0)) s] $*"; }
work=$(mktemp -d)

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
echo "cpus: $(nproc)"; python3 -V; git rev-parse --short HEAD 2>/dev/null || true

stage "packages"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SCRATCH/site" .whl/*.whl
fi
if ls "$SCRATCH"/ortc/part.* >/dev/null 2>&1 && [ ! -d "$SCRATCH/site/onnxruntime" ]; then
  cat "$SCRATCH"/ortc/part.* | xz -d -T0 | tar -x -C "$SCRATCH/site"
fi
python3 - <<'EOF'
import onnxruntime as ort, segmentation_models_pytorch as smp, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.is_available() and torch.cuda.get_device_name(0))
print("onnxruntime", ort.__version__, ort.get_available_providers(), "smp", smp.__version__)
EOF

stage "the GPU-marked tests (device augmentation; they are skipped on CPU-only machines)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/training/test_device_data.py 2>&1 | tail -6 ||
  echo "pytest is not installed here: the GPU tests did not run"

stage "train on $DEVICE: 20 CamVid train images, their masks imported, $STEPS steps, then export"
python3 - "$DATA/camvid" "$work/cv20" <<'EOF'
import json, os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(f"{dst}/images"); os.makedirs(f"{dst}/masks")
names = json.load(open(f"{src}/splits.json"))["train"][::18][:20]
for n in names:
    os.symlink(f"{os.path.abspath(src)}/images/{n}.jpg", f"{dst}/images/{n}.jpg")
    os.symlink(f"{os.path.abspath(src)}/masks/{n}.png", f"{dst}/masks/{n}.png")
os.symlink(f"{os.path.abspath(src)}/classes.json", f"{dst}/classes.json")
print(len(names), "images")
EOF
# 936 images for the end-to-end runs: every CamVid frame twice, in two folders (links, no copies)
mkdir -p "$work/many/a" "$work/many/b"
for f in "$DATA"/camvid/images/*; do ln -s "$(realpath "$f")" "$work/many/a/"; ln -s "$(realpath "$f")" "$work/many/b/"; done
echo "$(ls "$work/many/a" | wc -l) images x 2"
timeout 240 python3 -m labelsmart train --dataset "$work/cv20" --import-masks "$work/cv20/masks" --workdir "$work/w" \
  --models-dir "$work/models" --device "$DEVICE" --steps "$STEPS" 2>&1 | grep -v "DEBUG" | tail -8
MODEL=$(ls "$work"/models/*/v0001/model.onnx 2>/dev/null | head -1)
if [ -z "$MODEL" ]; then  # keep the serving stages alive: a few CPU steps give a model to time
  stage "training on $DEVICE failed; 20 CPU steps instead, for the serving stages"
  timeout 180 python3 -m labelsmart train --dataset "$work/cv20" --workdir "$work/w" --models-dir "$work/models" \
    --device cpu --steps 20 2>&1 | grep -v "DEBUG" | tail -4
  MODEL=$(ls "$work"/models/*/v000*/model.onnx 2>/dev/null | tail -1)
fi
CKPT=${MODEL%.onnx}.pt
echo "model: $MODEL"

if [ -n "$MODEL" ] && [ "${LS_SERVE:-1}" = 1 ]; then
  stage "serve on $DEVICE: ONNX Runtime against PyTorch, batch 1, 8, 32"
  timeout 240 python3 -m labelsmart bench serve --model "$MODEL" --checkpoint "$CKPT" \
    --images "$DATA/camvid/images" --batch 1,8,32 --device "$DEVICE" --repeat $R30 --out "$work/serve" 2>&1 |
    grep -v "DEBUG" | tail -60
  cp "$work/serve/serve.jsonl" "$OUT/serve-$DEVICE.jsonl" 2>/dev/null
  python3 - "$MODEL" <<'EOF'
import sys, onnxruntime as ort
ort.preload_dlls() if hasattr(ort, "preload_dlls") else None
want = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
try:
    s = ort.InferenceSession(sys.argv[1], providers=[p for p in want if p in ort.get_available_providers()])
    print("TensorRT probe: session providers", s.get_providers())
except Exception as exc:
    print("TensorRT probe failed:", str(exc).splitlines()[0][:300])
EOF

  stage "preannotate end to end on $DEVICE (936 images: every CamVid frame twice)"
  limit=""; [ "$QUICK" = 1 ] && limit="--limit 20"
  for post in host graph; do
    timeout 180 python3 -m labelsmart bench preannotate --model "$MODEL" --images "$work/many" --out "$work/pre" \
      --device "$DEVICE" --batch 8 --io-threads 12 --postprocess $post $limit 2>&1 | grep -v "DEBUG" | tail -4
  done
fi

if [ "${LS_LE:-1}" = 1 ]; then
LE="python3 -m labelsmart bench label-efficiency --pool $DATA/camvid --pool-split train_no_0006R0 --eval-split seq_0006R0
  --labels scribble --device $DEVICE --threads 8"
stage "training speed on $DEVICE: N=20, crops augmented on the device against CPU loader workers ($SPEED_ARGS)"
timeout 200 $LE --n-labeled 20 --rows labelsmart $SPEED_ARGS --out "$work/speed" 2>&1 | grep -v "DEBUG" | tail -3
timeout 200 $LE --n-labeled 20 --rows labelsmart $SPEED_ARGS --set train.device_augment=false --variant loader \
  --out "$work/speed" 2>&1 | grep -v "DEBUG" | tail -12
stage "label efficiency on $DEVICE: contrastive against CE ($LE_ARGS), then both after self-supervised pretraining ($SSL_ARGS)"
timeout 420 $LE --rows labelsmart,contrastive $LE_ARGS --out "$work/le" 2>&1 | grep -v "DEBUG" | tail -8
timeout 420 $LE --rows labelsmart,contrastive $LE_ARGS $SSL_ARGS --out "$work/le" 2>&1 | grep -v "DEBUG" | tail -16
mkdir -p "$OUT/le"
cat "$work"/speed/results.jsonl > "$OUT/le/speed.jsonl" 2>/dev/null
cp "$work"/le/results.jsonl "$work"/le/*.md "$work"/le/*.png "$OUT/le/" 2>/dev/null
fi

if [ "${LS_LOOP:-1}" = 1 ]; then
stage "annotation loop on $DEVICE ($LOOP_ARGS): time to the first pre-annotation, versions, steps"
timeout 400 python3 -m labelsmart bench loop --pool "$DATA/camvid" --pool-split train_no_0006R0 --eval-split seq_0006R0 \
  --set train.device="$DEVICE" $LOOP_ARGS --workdir "$work/loopw" --out "$work/loop" 2>&1 | grep -v "DEBUG" |
  grep -E "annotation_loop|published|steps" | tail -30
mkdir -p "$OUT/loop" && cp -r "$work"/loop/* "$OUT/loop/" 2>/dev/null
fi

if [ -n "$MODEL" ] && [ "${LS_CPU:-0}" = 1 ]; then
  stage "CPU, two pinned cores: serve with --tune, preannotate end to end"
  timeout 150 taskset -c 0,1 python3 -m labelsmart bench serve --model "$MODEL" --checkpoint "$CKPT" \
    --images "$DATA/camvid/images" --batch 1,8 --device cpu --threads 2 --repeat $R15 --tune --out "$work/cpu" 2>&1 |
    grep -v "DEBUG" | tail -22
  cat "$work/cpu/serve.jsonl" "$work/cpu/tune.jsonl" > "$OUT/cpu-serve-tune.jsonl" 2>/dev/null
  limit=""; [ "$QUICK" = 1 ] && limit="--limit 20"
  timeout 120 taskset -c 0,1 python3 -m labelsmart bench preannotate --model "$MODEL" --images "$work/many" \
    --out "$work/pre" --device cpu --batch 4 --threads 2 --io-threads 2 --limit 500 2>&1 | grep -v "DEBUG" | tail -4
  cp "$work/pre/preannotate.jsonl" "$OUT/preannotate.jsonl" 2>/dev/null
fi
stage "done"

#!/usr/bin/env bash
# One GPU call: the whole CUDA speed bench (README "Speed"), side by side with diffusers' trainer, in ~5 minutes.
#   1. builtin:sd15-random saved as a diffusers folder (weights drawn on the GPU), both trainers read it;
#   2. bench/speed.py at 512 px, bf16, rank 4: class images (48), 55 steps (50 timed after 5 warm-up), MFU;
#   3. the same at rank 8, class images kept from 2 (times training alone);
#   4. our default recipe end to end: 4 photos, 200 class images, default steps (600), command start to adapter
#      in the library (the model folder already on disk);
#   5. --low-memory: peak GPU memory at 512 px.
# Writes $OUT/speed.log and $OUT/speed.json (JSON lines: one object per part, with its exit code).
#
# Before the call, on the dev machine, from the repo root (the wheels are git-ignored in .whl/, ~22 MiB):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 open-clip-torch==3.3.0 "sqlalchemy==2.0.*" greenlet
#   mkdir -p .whl/peer && cp ../shared/peer/train_dreambooth_lora.py ../shared/peer/run_reference.sh .whl/peer/
# bitsandbytes is NOT carried: its wheel (43 MiB) does not fit the 64 MiB the tree and wheels may take, so
# --low-memory runs with 32-bit AdamW there and says so (LoRA's optimizer state is a few MB either way).
# The device's own torch 2.11 + torchvision 0.26 serve both trainers. Call: run(command="bash scripts/device_speed.sh",
# carry=[".whl"], timeout_s=540). Env knobs for a CPU dry run: DEVICE=cpu MODEL=builtin:sd15-toy RES=64 NCLASS=4
# STEPS=12 RECIPE_CLASS=8 RECIPE_STEPS=10 SKIP_SETUP=1 PY=.venv/bin/python (with PYTHONPATH=$PWD).
set -u
T_START=$(date +%s.%N)
mkdir -p .whl  # so a dry run without wheels still sources the setup
if [ "${SKIP_SETUP:-0}" = 1 ]; then OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; else source scripts/device_setup.sh; fi
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-builtin:sd15-random} RES=${RES:-512} NCLASS=${NCLASS:-48} STEPS=${STEPS:-55}
RECIPE_CLASS=${RECIPE_CLASS:-200} RECIPE_STEPS=${RECIPE_STEPS:-} PY=${PY:-python3}
W=${WORK:-/tmp/speed}; rm -rf "$W"; mkdir -p "$W"
export DEVICE RES W PY RECIPE_CLASS RECIPE_STEPS
LOG=$OUT/speed.log JSON=$OUT/speed.json; : > "$JSON"
say() { echo "[$(date +%T) +$(python3 -c "import time;print(round(time.time()-$T_START))")s] $*" | tee -a "$LOG"; }
part() {  # part NAME TIMEOUT CMD...: run one part, keep its JSON line, never stop the script
  local name=$1 limit=$2; shift 2
  say "== $name: $*"
  timeout "$limit" "$@" > "$W/$name.out" 2> "$W/$name.err"; local rc=$?
  tail -n 30 "$W/$name.err" >> "$LOG"; cat "$W/$name.out" >> "$LOG"
  say "== $name rc=$rc"
  "$PY" - "$name" "$rc" "$W/$name.out" >> "$JSON" <<'EOF'
import json, sys
name, rc, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = open(path).read()
try:
    body = json.loads(text[text.index("{"):])
except ValueError:
    body = {"output_tail": text[-500:]}
print(json.dumps({"part": name, "rc": rc, **body}))
EOF
}
"$PY" -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$LOG"
"$PY" -c "import bitsandbytes" 2>/dev/null && say "bitsandbytes present" || say "bitsandbytes absent: --low-memory uses 32-bit AdamW"
ls .whl/peer/run_reference.sh ../shared/peer/run_reference.sh shared/peer/run_reference.sh 2>/dev/null | head -1 | sed 's/^/reference: /' | tee -a "$LOG"

# 1. the model folder, once (both trainers and every part read it)
part save 120 "$PY" -c "import json,sys; from dreambooth_lora.builtin_configs import save_builtin; save_builtin('$MODEL', '$W/model', device='$DEVICE'); print(json.dumps({'model': '$MODEL'}))"

# 2. rank 4 side by side: class images, steady steps/s, wall, peak, MFU
part rank4 200 "$PY" bench/speed.py --device "$DEVICE" --model-dir "$W/model" --model "$MODEL" --res "$RES" --rank 4 \
  --steps "$STEPS" --num-class "$NCLASS" --work "$W/bench" --json
# 3. rank 8, class images kept (training speed alone)
part rank8 120 "$PY" bench/speed.py --device "$DEVICE" --model-dir "$W/model" --model "$MODEL" --res "$RES" --rank 8 \
  --steps "$STEPS" --num-class "$NCLASS" --work "$W/bench" --keep-class --json

# 4. the default recipe end to end (4 photos, 200 class images, default steps): command start to adapter in library
"$PY" - "$W/photos" "$RES" <<'EOF'
import sys; sys.path.insert(0, "bench")
from pathlib import Path
from speed import make_instance_photos
paths = make_instance_photos(Path(sys.argv[1]), int(sys.argv[2]))
from PIL import Image, ImageOps
ImageOps.mirror(Image.open(paths[0])).save(Path(sys.argv[1]) / "dog3.png")  # a fourth photo
EOF
recipe() {
  local t0; t0=$(date +%s.%N)
  "$PY" -m dreambooth_lora.cli train --images "$W"/photos/*.png --token sks --class-noun dog --base-model "$W/model" \
    --device "$DEVICE" --data-root "$W/recipe-data" --prior-dir "$W/recipe-prior" --quiet --timings \
    --num-class-images "$RECIPE_CLASS" ${RECIPE_STEPS:+--steps $RECIPE_STEPS} "$@" > "$W/recipe.json"
  local rc=$?
  "$PY" - "$t0" "$W/recipe.json" <<'EOF'
import json, sys, time
wall = time.time() - float(sys.argv[1])
r = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1]); t = r["timings"]
ends = t["step_ends"]; warm = max(1, len(ends) // 10)
print(json.dumps({"wall_s": round(wall, 2),
  "to_adapter_in_library_s": round(wall - (r["seconds"] - t["adapter_saved"]), 2),
  "steps": len(ends), "class_images": t["class_images"], "class_images_s": round(t["class_images_seconds"], 2),
  "steps_per_s": round((len(ends) - warm) / (ends[-1] - ends[warm - 1]), 2) if len(ends) > warm else None,
  "peak_gpu_gib": round(t.get("peak_gpu_bytes", 0) / 2**30, 2), "final_loss": r["final_loss"]}))
EOF
  return $rc
}
export -f recipe
part recipe 240 bash -c recipe

# 5. --low-memory peak (4 fresh class images, 30 steps)
lowmem() {
  "$PY" -m dreambooth_lora.cli train --images "$W"/photos/*.png --token sks --class-noun dog --base-model "$W/model" \
    --device "$DEVICE" --data-root "$W/low-data" --prior-dir "$W/low-prior" --quiet --timings --num-class-images 4 \
    --steps 30 --low-memory | "$PY" -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(json.dumps({'peak_gpu_gib': round(r['timings'].get('peak_gpu_bytes', 0)/2**30, 2), 'final_loss': r['final_loss']}))"
}
export -f lowmem
part lowmem 120 bash -c lowmem
say "done"
ls -la "$OUT" | tee -a "$LOG"

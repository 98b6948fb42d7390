#!/usr/bin/env bash
# One GPU call: each speed lever of README "Speed" on and off, our trainer alone (the side-by-side figures come
# from scripts/device_speed.sh). builtin:sd15-random, 512 px, bf16, rank 4, batch 1 + 1, 55 steps (50 timed after
# 5 warm-up), class images made once by the first part and kept. Writes $OUT/levers.log and $OUT/levers.json
# (one JSON line per part, with its exit code). Needs the wheels of scripts/device_speed.sh in .whl/.
# Call: run(command="bash scripts/device_levers.sh", carry=[".whl"], timeout_s=300).
set -u
source scripts/device_setup.sh
W=/tmp/levers; rm -rf "$W"; mkdir -p "$W"
LOG=$OUT/levers.log JSON=$OUT/levers.json; : > "$JSON"
python3 -c "from dreambooth_lora.builtin_configs import save_builtin; save_builtin('builtin:sd15-random', '$W/model', device='cuda')" \
  >> "$LOG" 2>&1 || echo "save failed" >> "$LOG"
lever() {  # lever NAME TIMEOUT [flags for our train command...]
  local name=$1 limit=$2; shift 2
  local flags=(); for f in "$@"; do flags+=("--ours-flag=$f"); done
  local keep=--keep-class; [ "$name" = baseline ] && keep=
  echo "== $name $* ($(date +%T))" >> "$LOG"
  timeout "$limit" python3 bench/speed.py --device cuda --model-dir "$W/model" --model builtin:sd15-random --res 512 \
    --rank 4 --steps 55 --num-class 48 --work "$W/bench" --skip-reference $keep "${flags[@]}" --json > "$W/$name.out" 2>> "$LOG"
  local rc=$?
  python3 - "$name" "$rc" "$W/$name.out" >> "$JSON" <<'PY'
import json, sys
name, rc, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = open(path).read()
try:
    ours = json.loads(text[text.index("{"):])["ours"]
except ValueError:
    ours = {"output_tail": text[-300:]}
print(json.dumps({"lever": name, "rc": rc, **ours}))
PY
  echo "== $name rc=$rc" >> "$LOG"
}
lever baseline 90
lever compile 150 --compile
lever channels-last 60 --channels-last
lever low-memory 60 --low-memory
lever loss-every-1 60 --loss-every 1
lever no-fused-adam 60 --no-fused-adam
cat "$JSON"

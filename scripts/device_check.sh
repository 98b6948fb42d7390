#!/usr/bin/env bash
# One GPU session: CUDA paths of the core (bf16, fp16, QLoRA NF4), then train builtin:tiny-world.
# Run on the lent GPU machine from the repo root, with the wheels in .whl (see README "GPU").
set -u
source scripts/device_setup.sh
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 - <<'PY' > "$OUT/images.txt"
from PIL import Image
import numpy as np
for i in range(3):
    Image.fromarray((np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")).save(f"/tmp/img{i}.png")
PY
for mode in "--mixed-precision bf16" "--mixed-precision fp16" "--mixed-precision bf16 --text-encoder qlora" "--mixed-precision no"; do
  start=$(date +%s.%N)
  timeout 120 python3 -m dreambooth_lora.cli train --images /tmp/img0.png /tmp/img1.png /tmp/img2.png --token sks --class-noun dog \
    --base-model builtin:tiny-random --steps 30 --num-class-images 4 --device cuda --quiet --data-root /tmp/dr --prior-dir /tmp/pr $mode 2>&1 | tail -2
  echo "core train on cuda [$mode]: rc=${PIPESTATUS[0]} $(python3 -c "import time;print(round(time.time()-$start,1))") s"
done
timeout 60 python3 -m dreambooth_lora.cli generate --prompt "a photo of sks dog" --adapter "$(python3 -m dreambooth_lora.cli library list --json --data-root /tmp/dr | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["name"])')=1.0" --data-root /tmp/dr --out /tmp/gen 2>&1 | tail -2
timeout ${TW_TIMEOUT:-420} python3 scripts/train_tiny_world.py --work /tmp/tw_work --out "$OUT/tiny-world" --log "$OUT/tw.log" \
  --vae-steps 4000 --vae-minutes ${VAE_MIN:-1.2} --minutes ${UNET_MIN:-4} --eval-per-prompt 16 2>&1 | grep -v -e "Writing model" -e "modules in"
echo "tiny-world rc=${PIPESTATUS[0]}"
[ -d "$OUT/tiny-world" ] && tar -cf "$OUT/tiny-world.tar" -C "$OUT" tiny-world && rm -rf "$OUT/tiny-world"
ls -la "$OUT"

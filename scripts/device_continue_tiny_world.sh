#!/usr/bin/env bash
# One GPU call: continue builtin:tiny-world's UNet and text encoder on a data mix with more two-colour
# objects (stage 2), evaluate prompt following, and return the folder as $OUT/tiny-world.tar.
# This call made the shipped stage 2 from stage 1; run again, it continues the shipped model.
# It needs no bitsandbytes: leave that wheel out of .whl to keep the carried tree under 64 MiB.
# Run on the lent GPU machine from the repo root, with the wheels in .whl (see README "GPU").
set -u
source scripts/device_setup.sh
python3 scripts/train_tiny_world.py --init-from dreambooth_lora/builtin/tiny-world --work /tmp/tw2 --out "$OUT/tiny-world" \
  --log "$OUT/tw2.log" --solid-share ${SOLID_SHARE:-0.4} --unet-batch ${UNET_BATCH:-2048} --warmup 200 \
  --minutes ${UNET_MIN:-6} --eval-per-prompt 16 2>&1 | grep -v -e "Writing model" -e "modules in" -e torchvision
echo "tiny-world stage 2 rc=${PIPESTATUS[0]}"
[ -d "$OUT/tiny-world" ] && tar -cf "$OUT/tiny-world.tar" -C "$OUT" tiny-world && rm -rf "$OUT/tiny-world"
ls -la "$OUT"

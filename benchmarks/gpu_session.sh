#!/usr/bin/env bash
# What a session with a lent GPU runs, in one go: tests/gpu, then the SD1.5 pipeline benchmark
# in fp16 at 512 px. Results go to $OUT (default: gpu_out/). The machine has torch but not
# diffusers: wheels in .whl/ (diffusers, importlib_metadata, DeepCache for the helper peer) are
# installed into /tmp/site first when present.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"
timeout "${TESTS_S:-260}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
timeout "${BENCH_S:-300}" python3 benchmarks/pipeline_speed.py --device cuda --dtype float16 --size 512 --steps 50 \
  --intervals 3,5,10 --branches 0 --variants nocache-eager,helper,dcfx-eager,dcfx-inductor --repeats 3 \
  --out /tmp/pipeline_speed 2>&1 | tail -60 | tee "$OUT/pipeline_speed.log"
cp /tmp/pipeline_speed/*.md /tmp/pipeline_speed/*.json /tmp/pipeline_speed/*.png "$OUT/" 2>/dev/null
exit 0

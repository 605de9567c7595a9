#!/bin/bash
# The one device-machine call: install the carried server wheels, restore the shared checkpoint in
# float32 from its carried fp16 copy, check the packed engine, run the bench. Results land in $OUT.
#   run(command="bash bench/gpu.sh", carry=[".whl", ".carry"])
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD/packages:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv
python3 -c "import torch, fastapi, uvicorn, orjson; from torch.nn.attention.varlen import varlen_attn; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'varlen ok')"
mkdir -p /tmp/minilm && cp .carry/minilm/* /tmp/minilm/ && python3 - <<'PY'
from safetensors.torch import load_file, save_file
d = load_file('/tmp/minilm/model.safetensors')
save_file({k: v.float() for k, v in d.items()}, '/tmp/minilm/model.safetensors', metadata={'format': 'pt'})
PY
python3 bench/run.py --check --checkpoint /tmp/minilm --conll .carry/data/eng.testa --seconds ${SECONDS_PER:-5} \
  --workdir /tmp/nb --out "$OUT/gpu.json" "$@" 2>&1 | grep -v "Loading weights" | tee "$OUT/log.txt"
cp "$OUT/gpu.md" "$OUT/table.md" 2>/dev/null; true

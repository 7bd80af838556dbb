#!/usr/bin/env bash
# GPU / NCCL check of ternary QAT, run on a CUDA machine from the repo root:
#   DATA=path/to/wikitext-2 OUT=/tmp/out bash benchmarks/gpu_check.sh
# 1. a random GPT-2-architecture model (saved as an HF folder) trained for STEPS steps
#    a) one process (CUDA, bf16 autocast), b) torchrun 1 process DDP over NCCL, c) the same with FSDP2;
#    the three runs must end with the same ternary codes (compare_runs.py);
# 2. bench_qat on the GPU: QAT+distillation / QAT / fp32 fine-tuning step times.
set -euo pipefail
DATA=${DATA:-../shared/data/wikitext-2}; OUT=${OUT:-/tmp/gpu_check}; STEPS=${STEPS:-30}
LAYERS=${LAYERS:-6}; WIDTH=${WIDTH:-256}; BENCH_MODELS=${BENCH_MODELS:-smollm2-arch,llama}
BENCH_ARGS=${BENCH_ARGS:---batch 8 --seq-len 512 --warmup 3 --repeats 10}
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
pip install -q --no-deps -e .  # tritpress.* is a namespace: import it installed
RUNS=$(mktemp -d); mkdir -p "$OUT"
python3 - "$RUNS/model" "$LAYERS" "$WIDTH" <<'PY'
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=8192, n_embd=int(sys.argv[3]), n_layer=int(sys.argv[2]), n_head=4, n_positions=256)
GPT2LMHeadModel(cfg).save_pretrained(sys.argv[1])
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
PY
ARGS=(--steps "$STEPS" --data "$DATA/valid.txt" --eval-data "$DATA/test.txt" --seq-len 128 --batch-size 16
      --eval-tokens 8192 --no-check)
python3 -m tritpress.cli.main "$RUNS/model" --out "$RUNS/single" "${ARGS[@]}"
for par in ddp fsdp; do
  python3 -m torch.distributed.run --standalone --nproc-per-node=1 -m tritpress.cli.main "$RUNS/model" \
    --out "$RUNS/$par" --parallel "$par" "${ARGS[@]}"
done
python3 benchmarks/compare_runs.py "$RUNS/single" "$RUNS/ddp" "$RUNS/fsdp" | tee "$OUT/compare.json"
for r in single ddp fsdp; do cp "$RUNS/$r/report.json" "$OUT/report_$r.json"; done
python3 benchmarks/bench_qat.py --device "$BENCH_DEVICE" --models "$BENCH_MODELS" $BENCH_ARGS > "$OUT/bench_qat_cuda.json"
python3 -c "import json; d=json.load(open('$OUT/bench_qat_cuda.json')); print(json.dumps(d['summary'], indent=1)); print(d['failures'])"

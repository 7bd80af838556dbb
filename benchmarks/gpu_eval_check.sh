#!/usr/bin/env bash
# Evaluation on CPU and on a GPU of the same post-training ternary random GPT-2: the rows must agree.
#   DATA=path/to/wikitext-2 DEV=cuda bash benchmarks/gpu_eval_check.sh
set -e
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
pip install -q --no-deps -e .  # tritpress.* is a namespace: import it installed
R=$(mktemp -d); DEV=${DEV:-cuda}; DATA=${DATA:-../shared/data/wikitext-2}
python3 -c "
import torch; from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0); GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_embd=128, n_layer=4, n_head=4, n_positions=256)).save_pretrained('$R/m')"
python3 -m tritpress.cli.main $R/m --out $R/ptq --no-check > /dev/null
for d in cpu $DEV; do
python3 -m tritpress.cli.main evaluate $R/ptq --baseline $R/m --tasks lm --lm-data $DATA/test.txt --lm-tokens 8192 --context 128 --stride 64 --device $d --out $R/eval_$d > $R/log_$d.txt 2>&1 || true
done
python3 - $R $DEV <<'PY'
import json, sys
r = sys.argv[1]
a, b = (json.load(open(f"{r}/eval_{d}/report.json")) for d in ("cpu", sys.argv[2]))
for x, y in zip(a["rows"], b["rows"]):
    print(x["task"], x["metric"], "cpu", x["baseline"], x["compressed"], "| dev", y["baseline"], y["compressed"])
print("devices:", a.get("protocol", {}).get("device"), b.get("protocol", {}).get("device"))
PY
tail -n 12 $R/log_$DEV.txt

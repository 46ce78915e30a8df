#!/usr/bin/env bash
# CUDA checks of the paths a GPU cluster runs (docs/cluster.md).
#
#   bash tools/gpu_check.sh [OUT_FOLDER]      (default results/gpu_check)
#
# Run from the repository root after `make install TORCH=cuda` and
# `make assets`. Each check writes its log to OUT_FOLDER/<check>.log and one
# line (status, seconds) to OUT_FOLDER/summary.md; a failing check does not
# stop the others, and the script exits 1 when any failed. Checks:
#   precision   `precision: auto` on CUDA (bf16 where the GPU has it)
#   tiny        SynthSpeech BLSP-KD, 64 clips, both stages + decoding, bf16
#   demo        the `make demo` configuration on the GPU
#   fsdp        the tiny run with the LLM sharded (FSDP2) on every GPU
#   offload     the same with fsdp_cpu_offload: True
#   offline     the tiny run with the stored top-k teacher (teacher: offline)
#   infer       blspkd-infer on the demo model's test clips, batch 8
# Everything runs on the GPUs this machine has (torchrun --nproc_per_node =
# number of GPUs for the sharded checks).
set -u
OUT=$(realpath -m "${1:-results/gpu_check}")
PY=${PY:-$(pwd)/.venv/bin/python}
ROOT=$(pwd)
RECIPE=$ROOT/recipes/SynthSpeech/speech_llm
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY" >&2
    exit 2
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
FAILED=0
echo "# GPU check $(date -u +%F) on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))') x $NGPU" > "$OUT/summary.md"

check() {  # check NAME COMMAND...
    local name=$1 start status
    shift
    start=$(date +%s)
    if (cd "$RECIPE" && "$@") > "$OUT/$name.log" 2>&1; then status=ok; else status=FAILED; FAILED=1; fi
    echo "| $name | $status | $(( $(date +%s) - start )) s |" | tee -a "$OUT/summary.md"
}

TINY=(hparams/blsp_kd.yaml --data_folder "$OUT/data" --num_train 64 --num_valid 16
      --num_test 16 --kd_train_subset 32 --align_epochs_limit 1 --kd_epochs_limit 1
      --eval_max_utterances 16 --eval_untrained False --device cuda:0)

check precision "$PY" -c "
from speechbrain_blspkd.utils import precision
choice = precision.choose('cuda')
print(choice.precision, choice.reason)
assert choice.precision in ('bf16', 'fp16', 'fp32')"
check tiny "$PY" train.py "${TINY[@]}" --output_folder "$OUT/tiny"
check demo "$PY" -m speechbrain_blspkd.demo --out "$OUT/demo" -- --device=cuda:0
check fsdp "$PY" -m torch.distributed.run --nproc_per_node="$NGPU" train.py "${TINY[@]}" \
    --output_folder "$OUT/fsdp" --distributed_strategy fsdp --distributed_backend nccl
check offload "$PY" -m torch.distributed.run --nproc_per_node="$NGPU" train.py "${TINY[@]}" \
    --output_folder "$OUT/offload" --distributed_strategy fsdp --fsdp_cpu_offload True \
    --distributed_backend nccl
check offline "$PY" train.py "${TINY[@]}" --output_folder "$OUT/offline" --teacher offline
check infer "$PY" -m speechbrain_blspkd.inference.cli --model "$OUT/demo/model" \
    --manifest "$OUT/demo/data/test.csv" --data-root "$OUT/demo/data" --batch-size 8 --out "$OUT/infer.jsonl" --device cuda:0
for run in tiny fsdp offload offline; do
    summary=$OUT/$run/eval/trained/summary.json
    [ -f "$summary" ] && echo "$run: $(head -c 400 "$summary" | tr '\n' ' ')" >> "$OUT/summary.md"
done
cat "$OUT/summary.md"
exit $FAILED

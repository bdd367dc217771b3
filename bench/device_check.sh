#!/usr/bin/env bash
# bench/device_check.sh: one short check for a machine with a GPU (CI never has one).
#
#   bash bench/device_check.sh [DEVICE]            # DEVICE default cuda; writes $OUT or bench/results/device/
#
# 1. the test suite (CPU tests; they must pass on the GPU machine's torch too);
# 2. llama.py on the device in bfloat16 against the CPU in float32: greedy ids on SmolLM2;
# 3. 20 sequential edits of each method on the device (bfloat16 weights) and on the CPU (float32),
#    same records and settings, the figures side by side in one JSON per run.
# Needs ../shared (SmolLM2's GGUF, CounterFact, the SFT-free ZsRE file); steps that cannot run say so.
set -u
DEV=${1:-cuda}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
OUTDIR=${OUT:-$ROOT/bench/results/device}
PY=${PYTHON:-python}
mkdir -p "$OUTDIR"
cd "$ROOT"
$PY -c "import torch, sys; ok = torch.cuda.is_available() if '$DEV'.startswith('cuda') else True; \
print('torch', torch.__version__, 'device', '$DEV', 'available', ok); sys.exit(0 if ok else 1)" || { echo "no $DEV: stop"; exit 1; }

echo "== 1. tests"
timeout 600 $PY -m pytest -q -x tests 2>&1 | tail -n 3 | tee "$OUTDIR/tests.txt"

echo "== 2. SmolLM2 on $DEV (bfloat16) vs cpu (float32)"
M=$OUTDIR/smollm2
if [ ! -f "$M/config.json" ]; then
    $PY "$SHARED/tools/smollm2_from_gguf.py" "$M" > "$OUTDIR/convert.txt" 2>&1 || echo "conversion failed: see $OUTDIR/convert.txt"
fi
for d in cpu "$DEV"; do
    $PY llama.py --ckpt "$M" --device "$d" --prompt "The capital of France is" --max-new-tokens 16 \
        > "$OUTDIR/greedy_$d.txt" 2>&1
done
diff -q "$OUTDIR/greedy_cpu.txt" "$OUTDIR/greedy_$DEV.txt" && echo "greedy text identical" || echo "greedy text differs (bfloat16)"

echo "== 3. 20 sequential edits per method, $DEV bf16 vs cpu fp32"
CF=$SHARED/data/counterfact/counterfact-edit.json
WT=$SHARED/data/wikitext/wikitext-2-raw-test.txt
for d in cpu "$DEV"; do
    for m in nse memit alphaedit; do
        rm -rf "$OUTDIR/${m}_$d"
        timeout 600 $PY nse.py --ckpt "$M" --edits "$CF" --n 20 --batch-size 10 --method $m --stats-text "$WT" \
            --stats-tokens 20000 --no-fluency --device "$d" --out "$OUTDIR/${m}_$d" > "$OUTDIR/${m}_$d.log" 2>&1
        tail -n 8 "$OUTDIR/${m}_$d.log"
    done
    rm -rf "$OUTDIR/scen_$d"
    timeout 600 $PY scen.py --ckpt "$M" --edits "$SHARED/data/zsre/zsre_mend_edit.json" --n 20 --device "$d" \
        --template chatml --system '' --unrelated "$SHARED/data/zsre/zsre_mend_train-1k.json" \
        --out "$OUTDIR/scen_$d" > "$OUTDIR/scen_$d.log" 2>&1
    tail -n 8 "$OUTDIR/scen_$d.log"
done
echo "== 4. $DEV (bfloat16) beside cpu (float32), same records and settings"
$PY - "$OUTDIR" "$DEV" <<'PY' | tee "$OUTDIR/compare.md"
import sys; from pathlib import Path
sys.path.insert(0, "bench"); import run
out, dev = Path(sys.argv[1]), sys.argv[2]
print("| run | metric | cpu float32 | " + dev + " bfloat16 |\n|---|---|---|---|")
for m in ("nse", "memit", "alphaedit", "scen"):
    cpu, gpu = (run.harness_figures(run.load(out / f"{m}_{d}" / "results.json"))[1] for d in ("cpu", dev))
    for k in sorted(set(cpu) | set(gpu)):
        if not any(w in k for w in ("s/edit", "seconds")):
            print(f"| {m} | {k} | {run.fmt(cpu.get(k)) or 'not run'} | {run.fmt(gpu.get(k)) or 'not run'} |")
PY
echo "results: $OUTDIR/*/results.json, $OUTDIR/compare.md"

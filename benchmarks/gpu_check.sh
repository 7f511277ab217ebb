#!/usr/bin/env bash
# One command for a CUDA machine, whichever GPU it has (the rows name it; the one lent to this
# project is an H200); < 9 minutes:
#
#     bash benchmarks/gpu_check.sh            # from the repository root
#
# 1. distillation step throughput, all methods (benchmarks/throughput.py --device cuda:
#    ResNet-50 -> MobileNetV1-1.0 @224, B=256; online/cached/student in bf16 + channels_last +
#    torch.compile, online_bf16_teacher with the teacher's weights cast to bf16 as well;
#    naive/torchdistill/timm in fp32), with peak memory of the KD step vs the student alone;
# 2. JPEG files on disk -> augmented batch on the GPU (benchmarks/input_pipeline.py): PIL in
#    DataLoader workers vs batched nvJPEG decode + GPU crops;
# 3. a summary against the issue's targets: online >= 10,000 img/s, cached >= 15,000 img/s,
#    JPEG pipeline >= 8,000 img/s, KD step peak memory <= 1.15x the student's.
#
# Everything goes to $OUT (default benchmarks/gpu_out/), seven flat files: RESULTS_gpu.md, a
# section to append to benchmarks/RESULTS.md as it is (a heading with the date and the GPU, a
# line with driver, torch, commit and command, the rows, each with its date, device and
# command, and the targets); throughput.json and input_pipeline.json, the raw numbers;
# gpu_check.log (all of the output), throughput.log, input_pipeline.log and pytest_cuda.log.
# DEVICE=cpu runs the same script at a tiny size (a dry run of the script itself, no numbers).
# Python: $PYTHON, else .venv/bin/python, else python3. torchdistill and timm (>= 1.0.20, for
# timm.task) missing from that interpreter are taken from .venv's site-packages if those folders
# are there (they are pure Python: carry them alone); a method whose peer library is still
# missing is skipped and says so. GIT_COMMIT names the commit where the tree has no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-benchmarks/gpu_out}
mkdir -p "$OUT"
RES="$OUT/RESULTS_gpu.md"
: > "$RES"
DEVICE=${DEVICE:-cuda}
COMMAND="DEVICE=$DEVICE bash benchmarks/gpu_check.sh"
COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "commit unknown")}

elapsed() { echo $(( $(date +%s) - START )); }
say() { printf '\n==== %s (t=%ds) ====\n' "$*" "$(( $(date +%s) - START ))"; }

main() {
if [ "$DEVICE" = cpu ]; then  # dry run
  TP_ARGS="--resolution 64 --batch-size 4 --steps 1 --warmup 1"; TP_REPEATS=1
  IP_ARGS="--images 32 --batch-size 8 --resolution 64"; WORKERS=1
else
  TP_ARGS=""; TP_REPEATS=5
  IP_ARGS="--images 4096 --batch-size 256"; WORKERS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
fi

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Benchmark-only peers missing from $PY (or too old: timm < 1.0.20 has no timm.task) are taken
# from .venv's site-packages when those folders are there (carried alone, without the venv).
SITE=$(ls -d .venv/lib/python3*/site-packages 2>/dev/null | head -1 || true)
PEERS=$(mktemp -d)
missing() {  # the peers that $PY cannot import, by package name, in one interpreter start
  "$PY" - torchdistill:torchdistill.losses.mid_level timm:timm.task.distillation <<'EOF' 2>/dev/null
import importlib, sys
for spec in sys.argv[1:]:
    pkg, mod = spec.split(":")
    try:
        importlib.import_module(mod)
    except Exception:  # noqa: BLE001
        print(pkg)
EOF
}
for pkg in $(missing); do
  if [ -n "$SITE" ] && [ -d "$SITE/$pkg" ]; then
    ln -s "$PWD/$SITE/$pkg" "$PEERS/$pkg" && echo "using $SITE/$pkg"
  fi
done
export PYTHONPATH="$PEERS:$PYTHONPATH"

say "environment"
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
      | head -1)
echo "nvidia-smi: ${GPU:-none}"
ENV_TEXT=$("$PY" - "$DEVICE" <<'EOF' 2>&1
import importlib, sys, torch
cuda = sys.argv[1] != "cpu"
assert torch.cuda.is_available() or not cuda, "torch sees no CUDA device"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if cuda else "CPU dry run")
for name in ("torchvision", "accelerate", "safetensors", "timm", "torchdistill", "triton"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:13s} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"  {name:13s} MISSING ({type(e).__name__}: {e})")
EOF
) || { echo "$ENV_TEXT"; echo "FATAL: torch with CUDA is required"; return 2; }
echo "$ENV_TEXT"
{
  echo "## GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), ${GPU:-$DEVICE, no GPU}"
  echo
  echo "$(echo "$ENV_TEXT" | head -1) · $COMMIT · \`$COMMAND\`"
} >> "$RES"

METHODS="naive online online_bf16_teacher cached student"
NOT_IMPORTABLE=$(missing)
for pkg in torchdistill timm; do
  if echo "$NOT_IMPORTABLE" | grep -qx "$pkg"; then
    echo "note: $pkg (with its distillation module) is not importable: its row is skipped"
  else METHODS="$METHODS $pkg"; fi
done

say "0/3 CUDA paths of the cache and the JPEG pipeline (pytest -k cuda)"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 60 "$PY" -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_perf_gpu_pipeline.py tests/test_cache_teacher_cache.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5
else
  echo "note: pytest is not importable: CUDA tests skipped"
fi

say "1/3 throughput (compile on)"
timeout 330 "$PY" benchmarks/throughput.py --device "$DEVICE" --methods $METHODS \
  --repeats $TP_REPEATS $TP_ARGS --json "$OUT/throughput.json" --results "$RES" 2>&1 \
  | tee "$OUT/throughput.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  if [ "$(elapsed)" -lt 300 ]; then
    say "1/3 throughput failed: again without torch.compile"
    timeout $(( 420 - $(elapsed) )) "$PY" benchmarks/throughput.py --device "$DEVICE" \
      --methods $METHODS --repeats 3 $TP_ARGS --compile off --json "$OUT/throughput.json" \
      --results "$RES" 2>&1 | tee -a "$OUT/throughput.log"
  else
    echo "throughput timed out with torch.compile; no time left for a run without it"
  fi
fi

say "2/3 JPEG input pipeline"
LEFT=$(( 480 - $(elapsed) )); [ "$LEFT" -gt 100 ] && LEFT=100; [ "$LEFT" -lt 30 ] && LEFT=30
timeout "$LEFT" "$PY" benchmarks/input_pipeline.py --device "$DEVICE" $IP_ARGS \
  --workers "$WORKERS" --repeats 2 --json "$OUT/input_pipeline.json" --results "$RES" 2>&1 \
  | tee "$OUT/input_pipeline.log"

say "3/3 summary against the targets"
"$PY" - "$OUT" "$RES" <<'EOF'
import json, sys
from pathlib import Path
out, res = Path(sys.argv[1]), Path(sys.argv[2])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
tp, ip = load("throughput.json"), load("input_pipeline.json")
checks = []
if tp:
    rows = {r["method"]: r for r in tp["rows"]}
    get = lambda m: rows[m]["images_per_s"] if m in rows else None
    checks.append(("online KD >= 10,000 img/s", get("online"), 10_000))
    checks.append(("cached >= 15,000 img/s", get("cached"), 15_000))
    for m in ("online", "online_bf16_teacher", "cached", "student", "naive", "torchdistill",
              "timm"):
        if m in rows:
            r = rows[m]
            mem = r["peak_mem_mib"]
            print(f"  {m:19s} {r['images_per_s']:9.0f} img/s  x{r['ratio_to_naive']:.2f} naive  "
                  f"peak step mem {mem if mem is None else round(mem)} MiB  ({r['setting']})")
    try:  # only comparable when both ran in the same precision (always the case on CUDA)
        ratio = float(tp["summary"].get("peak online/student", "n/a"))
    except ValueError:
        ratio = None
    checks.append(("KD peak mem <= 1.15x student", ratio, 1.15))
    print("  ratios:", tp["summary"])
if ip:
    print("  input pipeline:", {k: round(v) for k, v in ip["images_per_s"].items()})
    checks.append(("JPEG->GPU batch >= 8,000 img/s", ip["images_per_s"].get("batched"), 8_000))
print()
lines = []
for name, value, target in checks:
    if value is None:
        lines.append(f"[ n/a ] {name}")
        continue
    ok = value <= target if "mem" in name else value >= target
    lines.append(f"[{'PASS' if ok else 'MISS'}] {name}: {value:,.2f}")
print("\n".join(f"  {line}" for line in lines))
with res.open("a") as f:
    f.write("\nTargets (issue 7):\n\n" + "".join(f"- {line}\n" for line in lines))
EOF
say "done: append $RES to benchmarks/RESULTS.md; raw numbers in $OUT/*.json"
cat "$RES"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

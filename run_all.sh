#!/usr/bin/env bash
# Chain the full runs of both methods and print one results table.
#
#   bash run_all.sh                       # diffult + ldmlr x {cifar10, cifar100} x imb {100, 50, 10}
#   bash run_all.sh --dry-run             # print the commands only
#   DATASETS=digits RATIOS=20 SEEDS="0 1 2" EXTRA="--smoke" bash run_all.sh
#   LAUNCHER="torchrun --nproc_per_node 4" bash run_all.sh
#
# Settings (environment variables, or the flags of the same name in lower case, e.g.
# --datasets "cifar100" --ratios "100" --seeds "0 1"):
#   METHODS    scripts to run                         (default "diffult ldmlr")
#   DATASETS   datasets                               (default "cifar10 cifar100", plus imagenet_lt
#              when IMAGENET_ROOT holds ImageNet_LT_train.txt)
#   RATIOS     imbalance ratios for CIFAR / digits    (default "100 50 10")
#   SEEDS      seeds                                  (default "0")
#   LAUNCHER   how to start a script                  (default "python")
#   EXTRA      flags passed through to every run      (default "")
#   OUT        parent of the run directories          (default "runs")
#   DATA_ROOT  CIFAR / digits root                    (default "./data")
#   IMAGENET_ROOT  ImageNet root with the LT lists    (default "$DATA_ROOT/imagenet")
#   TABLE      where the markdown table is written    (default "$OUT/results_table.md")
# A failed run does not stop the chain; it is reported at the end and the exit code is 1.
set -u
cd "$(dirname "$0")"

DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --methods|--datasets|--ratios|--seeds|--launcher|--extra|--out|--data-root|--imagenet-root|--table)
      [ $# -ge 2 ] || { echo "run_all.sh: $1 needs a value" >&2; exit 2; }
      name=$(echo "${1#--}" | tr 'a-z-' 'A-Z_'); printf -v "$name" '%s' "$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

METHODS=${METHODS:-"diffult ldmlr"}
DATA_ROOT=${DATA_ROOT:-./data}
IMAGENET_ROOT=${IMAGENET_ROOT:-$DATA_ROOT/imagenet}
if [ -z "${DATASETS:-}" ]; then
  DATASETS="cifar10 cifar100"
  [ -f "$IMAGENET_ROOT/ImageNet_LT_train.txt" ] && DATASETS="$DATASETS imagenet_lt"
fi
RATIOS=${RATIOS:-"100 50 10"}
SEEDS=${SEEDS:-0}
LAUNCHER=${LAUNCHER:-python}
EXTRA=${EXTRA:-}
OUT=${OUT:-runs}
TABLE=${TABLE:-$OUT/results_table.md}
PYTHON=${PYTHON:-python}

failed=()
run_dirs=()
for method in $METHODS; do
  for dataset in $DATASETS; do
    if [ "$dataset" = imagenet_lt ]; then ratios=256; root=$IMAGENET_ROOT; else ratios=$RATIOS; root=$DATA_ROOT; fi
    for imb in $ratios; do
      for seed in $SEEDS; do
        out="$OUT/${method}_${dataset}_imb${imb}_seed${seed}"
        cmd="$LAUNCHER $method.py --dataset $dataset --imb $imb --seed $seed --data-root $root --out $out $EXTRA"
        run_dirs+=("$out")
        if [ "$DRY_RUN" = 1 ]; then echo "$cmd"; continue; fi
        echo "== $cmd"
        # shellcheck disable=SC2086  # word splitting of LAUNCHER and EXTRA is intended
        if ! $cmd; then failed+=("$cmd"); fi
      done
    done
  done
done
[ "$DRY_RUN" = 1 ] && exit 0

mkdir -p "$(dirname "$TABLE")"
"$PYTHON" - "$TABLE" "${run_dirs[@]}" <<'EOF'
"""One markdown table of every results.json: rows = method / row, columns = dataset / ratio (mean
over seeds), plus Many / Medium / Few for CIFAR-100-LT r=100, ImageNet-LT and digits."""
import json, os, sys
from collections import defaultdict

table_path, dirs = sys.argv[1], sys.argv[2:]
acc = defaultdict(list)  # (method, row, column, metric) -> values over seeds
columns, rows = [], []
for d in dirs:
    path = os.path.join(d, "results.json")
    if not os.path.isfile(path):
        continue
    r = json.load(open(path))
    col = r["dataset"] if r["dataset"] == "imagenet_lt" else f"{r['dataset']} r={r['imb']:g}"
    groups = r["dataset"] in ("imagenet_lt", "digits") or (r["dataset"] == "cifar100" and r["imb"] == 100)
    for name, row in r["rows"].items():
        key = (r["method"], name)
        if key not in rows:
            rows.append(key)
        metrics = ("overall", "many", "medium", "few") if groups else ("overall",)
        for m in metrics:
            c = col if m == "overall" else f"{col} {m}"
            if c not in columns:
                columns.append(c)
            if row.get(m) is not None:
                acc[key + (c,)].append(row[m])

def cell(values):
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} (n={len(values)})"

lines = ["| method | row | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
for method, name in rows:
    lines.append(f"| {method} | {name} | " + " | ".join(cell(acc[(method, name, c)]) for c in columns) + " |")
text = "\n".join(lines) + "\n"
with open(table_path, "w") as f:
    f.write(text)
print(text)
EOF

if [ ${#failed[@]} -gt 0 ]; then
  echo "run_all.sh: ${#failed[@]} run(s) failed:" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "table written to $TABLE"

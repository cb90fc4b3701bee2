# EK-FAC (kronfluence) against TRAK on a tiny digits ResNet: LDS of uniform and learned group weights.
# Run from an empty folder: bash /path/to/bench/bench_ekfac_quick.sh (PYTHONPATH and the python are set below).
set -e
export PYTHONPATH="${PYTHONPATH:-$(cd "$(dirname "$0")/.." && pwd)/src}" OMP_NUM_THREADS=1
G="nice ${PYTHON:-python} -m gradtrace.cli"
seq 0 299 > train.txt; seq 300 349 > eval.txt; seq 350 399 > learn.txt
D="--data digits --n 400"
t() { local s=$(date +%s.%N); "$@"; echo "TIME $(echo "$(date +%s.%N) - $s" | bc) :: ${*:3:3}"; }
t $G train --adapter classifier --model resnet $D --ids train.txt --steps 300 --batch-size 64 --lr 0.01 --model-options '{"widths": [8, 16], "blocks": [1, 1]}' --out run --no-progress
t $G retrain --run run --subsets 16 --no-progress
t $G attribute --method ekfac --checkpoint run $D --ids eval.txt --factors factors --lambda-c 0.1 --out ek-uniform --no-progress
t $G learn-weights --method ekfac --checkpoint run $D --ids learn.txt --factors factors --out ek-w.json --no-progress
t $G attribute --method ekfac --checkpoint run $D --ids eval.txt --factors factors --weights ek-w.json --out ek-learned --no-progress
C=$(python3 -c "import json; print(json.load(open('ek-w.json'))['provenance']['lambda_c'])")
t $G attribute --method ekfac --checkpoint run $D --ids eval.txt --factors factors --lambda-c $C --out ek-uniform-c --no-progress
for a in ek-uniform ek-uniform-c ek-learned; do t $G eval lds --run run --retrain run/retrain --attributions $a --out lds-$a --no-progress; done
t $G featurize --checkpoint run --projection identity --out ft --no-progress
t $G featurize --checkpoint run $D --ids eval.txt --projection identity --out fq --no-progress
t $G eval lds --run run --retrain run/retrain --train-features ft --queries fq --lambda-c 0.1 --out lds-trak --no-progress

#!/usr/bin/env bash
# One GPU run (H100/H200): leave-one-structure-out meta-training folds, ablations, the shipped
# model, and core adaptation latency on the GPU. Inputs are study banks made by `metaapp bank`
# in $BANKS (cmr_train.npz: MS-CMRSeg studies 1-25; cmr_all.npz: all 35; totalseg.npz; optional
# samples.npz), plus an optional MONAI wheel for a machine without network access. Each run comes
# back as its own small tarball in $OUT.
#   BANKS=banks OUT=out MIN=6 bash benchmarks/gpu_run.sh
set -u
MIN=${MIN:-6}
B=${BANKS:-banks}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls $B/monai-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $B/monai-*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/runs; mkdir -p $W
common="--device cuda --minutes $MIN --tasks-per-step 8 --checkpoint-seconds 60"
run() { name=$1; shift; OMP_NUM_THREADS=2 python3 -m monailabel_metaapp meta-train --out $W/$name.pt $common "$@" > $W/$name.out 2>&1 & }
run fold200 --studies $B/cmr_train.npz $B/totalseg.npz --exclude 200
run fold500 --studies $B/cmr_train.npz $B/totalseg.npz --exclude 500
run fold600 --studies $B/cmr_train.npz $B/totalseg.npz --exclude 600
run fold500_nokl --studies $B/cmr_train.npz $B/totalseg.npz --exclude 500 --lambda-kl 0
run fold500_fixedlr --studies $B/cmr_train.npz $B/totalseg.npz --exclude 500 --fixed-lr
run final --studies $B/cmr_all.npz $B/totalseg.npz $(ls $B/samples.npz 2>/dev/null)
fail=0
for j in $(jobs -p); do wait $j || fail=1; done
for n in fold200 fold500 fold600 fold500_nokl fold500_fixedlr final; do
  tail -c 600 $W/$n.out | tr '\r' '\n' | tail -n 4
  tail -n 1 $W/$n.pt.log.jsonl 2>/dev/null
  (cd $W && tar czf $OUT/$n.tgz $n.pt $n.pt.json $n.pt.log.jsonl $n.out 2>/dev/null)
done
python3 benchmarks/gpu_latency.py $W/final.pt $B/cmr_all.npz > $OUT/gpu_latency.json || fail=1
cat $OUT/gpu_latency.json
ls -la $OUT
exit $fail

#!/usr/bin/env bash
# The device checks in one run (about 9 minutes on an H200): meta-training throughput of the old and
# new episode pipelines, quick-head and refinement latency, then the shipped model continued on the
# device with the classic and the bank sampler side by side (candidates, compared on the CPU with
# benchmarks/experiments/compare_seg_models.py before one ships).
# Inputs in $BANKS: cmr_all.npz and totalseg.npz (`metaapp bank`, the shipped model's sources), and a
# MONAI wheel for a machine without a package registry. $COMMIT names the commit of the copy (its
# results are stamped with it, whatever git metadata the copy holds). Results land in $OUT.
#   BANKS=.gpu OUT=out MIN=4 COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh
# A smoke run of the same script on a CPU: DEVICE=cpu MIN=0.3 STEPS=1 ROUNDS=1 BANKS=.gpu bash ...
set -u
MIN=${MIN:-4}
DEV=${DEVICE:-cuda}
B=${BANKS:-banks}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export METAAPP_COMMIT=${COMMIT:-} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls $B/monai-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $B/monai-*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
fail=0
SHIPPED=monailabel_metaapp/weights/metaseg.pt
python3 benchmarks/metatrain_throughput.py --device $DEV --studies $B/cmr_all.npz $B/totalseg.npz \
  --steps ${STEPS:-8} --rounds ${ROUNDS:-2} --out $OUT/metatrain_throughput_$DEV.json || fail=1
python3 benchmarks/gpu_latency.py $SHIPPED $B/cmr_all.npz --device $DEV --out $OUT/gpu_latency_$DEV.json || fail=1
W=/tmp/runs; mkdir -p $W
common="--studies $B/cmr_all.npz $B/totalseg.npz --init $SHIPPED --fresh --device $DEV --minutes $MIN --tasks-per-step 8 --checkpoint-seconds 60"
for sampler in classic bank; do
  OMP_NUM_THREADS=4 python3 -m monailabel_metaapp meta-train $common --sampler $sampler --out $W/$sampler.pt > $W/$sampler.out 2>&1 &
done
for j in $(jobs -p); do wait $j || fail=1; done
for n in classic bank; do
  tail -c 800 $W/$n.out | tr '\r' '\n' | tail -n 4
  (cd $W && tar czf $OUT/cont_$n.tgz $(ls $n.pt $n.pt.json $n.best.pt $n.best.pt.json $n.pt.log.jsonl $n.out 2>/dev/null))
done
ls -la $OUT
exit $fail

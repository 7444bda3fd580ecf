#!/usr/bin/env bash
# Nsight Compute of one GLM-4.6 GEMM: `bash scripts/ncu_gemm.sh [w13|w2 [M [TILE ...]]]`, TILE one of
# table, wgmma or a GemmTile expression without spaces (it names the report files too);
# reports and the top warp stalls under $OUT.
source scripts/device_setup.sh >/dev/null 2>&1; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
which=${1:-w13}; M=${2:-8192}; shift $(( $# < 2 ? $# : 2 )); tiles=${@:-table}
NCU="ncu --clock-control none --launch-skip 2 --launch-count 1 -k regex:grouped_gemm --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section SourceCounters"
for t in $tiles; do
  r=$OUT/${which}_${M}_$t
  timeout 200 $NCU -o $r -f python3 scripts/ncu_gemm.py $which $M $t > $r.log 2>&1 || tail -3 $r.log
  ncu --import $r.ncu-rep --page details > $r.details.txt 2>&1
  ncu --import $r.ncu-rep --page source --csv --print-source sass > $r.sass.csv 2>&1
  grep -E "Duration|Issue Slots Busy|Registers Per" $r.details.txt | head -4
  python3 scripts/ncu_stalls.py $r.sass.csv 8; rm -f $r.ncu-rep
done

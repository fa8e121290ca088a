#!/usr/bin/env bash
# The GPU test sweep: the Triton kernel's hypothesis test in $PROCS processes and the FP8 kernel's in
# $FP8_PROCS, with different --hypothesis-seed values ($EXAMPLES examples each; compile-bound, so in
# parallel), and every other test file that runs GPU code where there is one, once, one process per
# file: rectification, Flex, FA4 (skipped where it is not installed), jit globals, the sm90 builds,
# FP8 sites, key masks (kernel and model level), pooling, selection, block mass, quantize, kernel
# choice, backend, the example and the multi-GPU smoke run (CPU processes, but on a GPU machine).
# Logs to ${OUT:-.}/sweep-*.txt, a summary on stdout (a file whose pytest ran past $LIMIT s says so).
set -u
PROCS=${PROCS:-12} FP8_PROCS=${FP8_PROCS:-4} EXAMPLES=${EXAMPLES:-40} LIMIT=${LIMIT:-300} OUT=${OUT:-.}
for s in $(seq 1 "$PROCS"); do
  COMPACT_GPU_EXAMPLES=$EXAMPLES timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_triton_sparse.py --hypothesis-seed="$s" > "$OUT/sweep-triton-$s.txt" 2>&1 &
done
for s in $(seq 1 "$FP8_PROCS"); do
  COMPACT_GPU_EXAMPLES=$EXAMPLES timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_fp8.py --hypothesis-seed="$s" > "$OUT/sweep-fp8-$s.txt" 2>&1 &
done
for f in tests/kernels/test_rectified.py tests/kernels/test_flex.py tests/kernels/test_fa4.py tests/kernels/test_fa4_fp8.py \
  tests/kernels/test_fa4_lists.py tests/kernels/test_jit_globals.py tests/kernels/test_sm90_builds.py \
  tests/test_fp8_attention.py tests/kernels/test_key_mask_triton.py tests/kernels/test_pool_triton.py \
  tests/kernels/test_select_triton.py tests/calibrate/test_block_mass.py tests/test_quantize.py \
  tests/test_kernel_choice.py tests/test_key_masks.py tests/test_backend.py tests/examples/test_wan_compact.py \
  tests/benchmarks/test_e2e_multigpu_smoke.py; do
  timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider -rf "$f" > "$OUT/sweep-once-$(basename "$f" .py).txt" 2>&1 &
done
wait
for f in "$OUT"/sweep-*.txt; do
  last=$(tail -n 1 "$f")
  grep -qE "(passed|failed|error|skipped|no tests ran).* in [0-9.]+s" <<< "$last" || last="STOPPED at $LIMIT s: $last"
  echo "$(basename "$f"): $last"
  grep "^FAILED" "$f" | head -20
  grep -E "^E   +(Assertion|assert|.*Error)|^E +Failing test case|^E +(c|site)=|^E +'(S|D|dtype|bs|block_m|block_n|tma|sharpness|scale)'" "$f" | head -20
done
cat "$OUT"/sweep-*.txt > "$OUT/sweep-all.log"; rm -f "$OUT"/sweep-triton-*.txt "$OUT"/sweep-fp8-*.txt "$OUT"/sweep-once-*.txt

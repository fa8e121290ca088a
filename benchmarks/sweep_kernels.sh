#!/usr/bin/env bash
# The GPU property sweep of the kernel tests: the Triton kernel's hypothesis test in $PROCS processes
# and the FP8 kernel's in $FP8_PROCS, with different --hypothesis-seed values ($EXAMPLES examples each;
# compile-bound, so in parallel: one process with the tests' GPU default of 200 FP8 examples ran past
# 150 s), and the rectification, Flex, FA4 and jit-globals tests once (FA4's skip where it is not
# installed). Logs to ${OUT:-.}/sweep-*.txt, a summary on stdout.
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
timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rectified.py tests/kernels/test_flex.py \
  tests/kernels/test_fa4.py tests/kernels/test_jit_globals.py tests/test_fp8_attention.py \
  > "$OUT/sweep-rectified-flex-fa4-fp8site.txt" 2>&1 &
wait
for f in "$OUT"/sweep-*.txt; do
  echo "$(basename "$f"): $(tail -n 1 "$f")"
  grep -E "^E   +(Assertion|assert|.*Error)|^E +Failing test case|^E +(c|site)=|^E +'(S|D|dtype|bs|block_m|block_n|tma|sharpness|scale)'" "$f" | head -20
done
cat "$OUT"/sweep-*.txt > "$OUT/sweep-all.log"; rm -f "$OUT"/sweep-triton-*.txt "$OUT"/sweep-fp8-*.txt

#!/usr/bin/env bash
# The GPU property sweep of the kernel tests: the Triton kernel's hypothesis test in $PROCS processes
# with different --hypothesis-seed values ($EXAMPLES examples each; compile-bound, so in parallel),
# and the rectification, Flex and FA4 tests once (FA4's skip where it is not installed). Logs to
# ${OUT:-.}/sweep-*.txt, a summary on stdout.
set -u
PROCS=${PROCS:-16} EXAMPLES=${EXAMPLES:-40} LIMIT=${LIMIT:-300} OUT=${OUT:-.}
for s in $(seq 1 "$PROCS"); do
  COMPACT_GPU_EXAMPLES=$EXAMPLES timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_triton_sparse.py --hypothesis-seed="$s" > "$OUT/sweep-triton-$s.txt" 2>&1 &
done
timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rectified.py tests/kernels/test_flex.py \
  tests/kernels/test_fa4.py > "$OUT/sweep-rectified-flex-fa4.txt" 2>&1 &
wait
for f in "$OUT"/sweep-*.txt; do
  echo "$(basename "$f"): $(tail -n 1 "$f")"
  grep -E "^E   +(Assertion|assert|.*Error)|^E +Failing test case|^E +(c|site)=|^E +'(S|D|dtype|bs|block_m|block_n|tma|sharpness|scale)'" "$f" | head -20
done
cat "$OUT"/sweep-*.txt > "$OUT/sweep-all.log"; rm -f "$OUT"/sweep-triton-*.txt

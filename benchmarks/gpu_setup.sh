#!/usr/bin/env bash
# Installs what a GPU run needs on a machine without a package index, from carried files:
#   this repository (editable, its dependencies already on the image except those below),
#   .whl/*.whl (e.g. diffusers: pip download --no-deps … -d .whl diffusers==0.42.1),
#   FlashAttention-4 and its CUTLASS DSL: the archives of ../shared/gpu/pack_fa4_wheels.sh, unpacked
#   into site-packages (the DSL is found through a .pth file there). Archives too large to carry in
#   one call may come as `split` parts over several calls of one warm machine: each call copies the
#   parts it carries (.fa4/) to /tmp/fa4parts, and the archives are joined once all are there.
#     usage: bash benchmarks/gpu_setup.sh
set -euo pipefail
sp=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Running pip as" || true
if [ -d .whl ]; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | grep -v "^WARNING: Running pip as" || true
fi
mkdir -p /tmp/fa4parts
[ -d .fa4 ] && cp .fa4/* /tmp/fa4parts/
# PARTS lists every file the archives need; join and unpack once they are all here
if [ -f /tmp/fa4parts/PARTS ] && ! python3 -c 'import flash_attn.cute, cutlass' 2>/dev/null; then
  missing=$(cd /tmp/fa4parts && for f in $(cat PARTS); do [ -f "$f" ] || echo "$f"; done)
  if [ -n "$missing" ]; then
    echo "FA4 archive parts not here yet: $missing"
  else
    tar -xJf /tmp/fa4parts/fa4_py.tar.xz -C "$sp"
    cat /tmp/fa4parts/fa4_cutlass_cu13.part_* | tar -xJf - -C "$sp"
  fi
fi
python3 - <<'PY'
import torch, triton
try:
    import flash_attn.cute, cutlass  # noqa: F401
    fa4 = "FA4 importable"
except Exception as e:  # noqa: BLE001
    fa4 = f"FA4 not importable ({type(e).__name__}: {e})"
import diffusers
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "diffusers", diffusers.__version__, fa4, flush=True)
PY

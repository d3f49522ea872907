#!/usr/bin/env bash
# Run a command with MKL's Intel code paths forced on (see mkl_intel_path.c), e.g.
#   bench/as_intel_mkl.sh python bench/train_speed.py --device cpu --size 17m --json
# On an Intel CPU this changes nothing; on an AMD CPU MKL then runs its Intel kernels. The
# benchmark records say so ("mkl_intel_paths_forced": true). Give the probe of the linear-layer
# library its own cache (ETTIN_CACHE_DIR) so it measures MKL as it now runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lib="${TMPDIR:-/tmp}/ettin-mkl-intel-path-$(id -u).so"
if [ ! -f "$lib" ] || [ "$here/mkl_intel_path.c" -nt "$lib" ]; then
  cc -shared -fPIC -O2 -o "$lib.tmp.$$" "$here/mkl_intel_path.c" && mv -f "$lib.tmp.$$" "$lib"
fi
export ETTIN_CACHE_DIR="${ETTIN_CACHE_DIR:-${TMPDIR:-/tmp}/ettin-cache-intel-mkl-$(id -u)}"
LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" exec "$@"

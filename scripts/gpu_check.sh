#!/usr/bin/env bash
# What a lent GPU machine runs (issue 18; ../shared/PLATFORM.md §7): MLX's CUDA build
# installed from carried wheels, the default device confirmed a GPU, the model /
# step / generation / convert tests on it (bf16 compute), and the step benchmark.
#
#   bash scripts/gpu_check.sh --prepare    # here: download, split, print the run calls
#   bash scripts/gpu_check.sh --stage 1    # GPU machine, call 1: store what it carried
#   bash scripts/gpu_check.sh --stage 2    # GPU machine, call 2: join, install, check
#   bash scripts/gpu_check.sh --stage 2 --no-install   # check with the mlx at hand
#
# Options: --skip-tests, --skip-bench (stage 2), -h/--help.
# The machine has no network and carries at most 64 MiB per call, so --prepare puts
# the mlx-cuda-13 wheel in two <=45 MiB parts, one per call, and fills the rest of
# each call with the project's dependencies (cp312 wheels) by priority; stage 2
# installs only those the machine lacks, into $GPU_CHECK_SITE (/tmp/site).
# Outputs and logs: $OUT (default ./gpu_check_out); exit 3 when a check fails (a
# CPU default device fails before anything long runs), 2 for a usage mistake.
# Environment: PYTHON (python3); GPU_CHECK_CARRY (build/gpu_carry, git-ignored),
# GPU_CHECK_STORE (/root/gpu_check), GPU_CHECK_SITE (/tmp/site); limits in seconds
# GPU_CHECK_TEST_S=180, GPU_CHECK_BENCH_S=200 (the whole of stage 2 stays < 8 min).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-build/gpu_carry}  # in the repository (git-ignored) for --prepare
STORE=${GPU_CHECK_STORE:-/root/gpu_check}
SITE=${GPU_CHECK_SITE:-/tmp/site}
TEST_S=${GPU_CHECK_TEST_S:-180}
BENCH_S=${GPU_CHECK_BENCH_S:-200}
MLX_VERSION=0.32.4
MLX_LM_VERSION=0.32.2
PART=45M
CALL_LIMIT=$((64 * 1024 * 1024))
# The model / step / generation / convert subset (about 3 minutes is the aim), then
# the kernels and model options; a run cut by its limit still reports what ran.
TESTS=(tests/test_model.py tests/test_step.py tests/test_generate.py
  tests/test_convert.py tests/test_kernels.py tests/test_model_options.py)

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: error: $*" >&2; exit 2; }
fail() { echo "gpu_check: FAIL: $*" >&2; exit 3; }
fail_from() {  # a step logged its FAIL line (and more) in $1: repeat it on stderr
  fail "$(grep -h 'FAIL: ' "$1" | tail -n 1 | sed 's/.*FAIL: //') (log: $1)"
}

MODE="" STAGE="" INSTALL=1 RUN_TESTS=1 RUN_BENCH=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare; shift ;;
    --stage)
      [ $# -ge 2 ] || die "--stage needs 1 or 2"
      case "$2" in 1|2) STAGE=$2 ;; *) die "--stage needs 1 or 2, not '$2'" ;; esac
      MODE=stage; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    --skip-bench) RUN_BENCH=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$MODE" ] || die "say --prepare, --stage 1 or --stage 2 (see --help)"

# ------------------------------------------------------------ here: --prepare
platforms() {  # pip takes no range of manylinux tags: name each one
  local t
  for t in 2_35 2_34 2_31 2_28 2_27 2_24 2_17; do echo "--platform manylinux_${t}_x86_64"; done
  echo "--platform manylinux2014_x86_64"
}

# Lower ranks are carried first; what does not fit is left behind (and named).
rank() {
  case "$1" in
    mlx-*) echo 0 ;;
    pytest-* | pluggy-* | iniconfig-* | packaging-* | pyyaml-* | safetensors-*) echo 1 ;;
    sentencepiece-* | tokenizers-* | tqdm-* | mlx_lm-* | protobuf-* | jinja2-*) echo 1 ;;
    markupsafe-*) echo 1 ;;
    numpy-*) echo 3 ;;  # a PyTorch machine almost surely has it
    *) echo 2 ;;
  esac
}

prepare() {
  local dl=$CARRY/download big tree room1 room2 f size left=()
  rm -rf "$CARRY" && mkdir -p "$dl" "$CARRY/1" "$CARRY/2"
  echo "gpu_check: downloading cp312 wheels into $dl"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_35_x86_64 -d "$dl" \
    "mlx-cuda-13==$MLX_VERSION" "mlx==$MLX_VERSION"
  local cons=()
  if [ -x .venv/bin/python ]; then  # the versions this project is tested with
    .venv/bin/python -m pip freeze | grep -E '^[A-Za-z0-9_.-]+==' \
      | grep -viE '^(mlx|mlx-cpu|mlx-metal|torch)==' >"$CARRY/constraints.txt" || true
    cons=(-c "$CARRY/constraints.txt")
  fi
  # shellcheck disable=SC2046
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 \
    --implementation cp $(platforms) -d "$dl" "${cons[@]}" "mlx==$MLX_VERSION" \
    "mlx-lm==$MLX_LM_VERSION" pytest numpy pyyaml sentencepiece tokenizers \
    safetensors tqdm transformers 2> >(grep -v '^WARNING: Location' >&2)
  rm -f "$dl"/hf_xet-*  # downloads only: never used offline
  big=$(ls "$dl"/mlx_cuda_13-*.whl)
  (cd "$dl" && sha256sum "$(basename "$big")") >"$CARRY/2/SHA256SUMS"
  split -b "$PART" -d -a 2 "$big" "$CARRY/$(basename "$big").part-"
  [ -f "$CARRY/$(basename "$big").part-01" ] && [ ! -e "$CARRY/$(basename "$big").part-02" ] \
    || { echo "gpu_check: the CUDA wheel does not split into two $PART parts" >&2; exit 1; }
  mv "$CARRY/$(basename "$big").part-00" "$CARRY/1/"
  mv "$CARRY/$(basename "$big").part-01" "$CARRY/2/"
  rm -f "$big"
  # What travels anyway: the working tree (tracked and untracked, not ignored).
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
  room1=$((CALL_LIMIT - tree - 1048576 - $(du -cb "$CARRY/1" | tail -1 | cut -f1)))
  room2=$((CALL_LIMIT - tree - 1048576 - $(du -cb "$CARRY/2" | tail -1 | cut -f1)))
  while read -r _ size f; do
    if [ "$size" -le "$room1" ]; then mv "$f" "$CARRY/1/"; room1=$((room1 - size))
    elif [ "$size" -le "$room2" ]; then mv "$f" "$CARRY/2/"; room2=$((room2 - size))
    else left+=("$(basename "$f")"); fi
  done < <(for f in "$dl"/*.whl; do
    echo "$(rank "$(basename "$f")") $(stat -c %s "$f") $f"; done | sort -k1,1n -k2,2n)
  rm -rf "$dl"
  echo "gpu_check: call 1 carries $(du -sh "$CARRY/1" | cut -f1), call 2 $(du -sh "$CARRY/2" | cut -f1) (+ the working tree, $((tree / 1024)) KiB; limit 64 MiB each)"
  [ ${#left[@]} -eq 0 ] || echo "gpu_check: left behind (no room; stage 2 says if the machine lacks them): ${left[*]}"
  cat <<EOF

Make these two device calls back to back (the machine goes back soon after a call):
  run  command: bash scripts/gpu_check.sh --stage 1
       carry:   ["$CARRY/1"]
       timeout_s: 120
  run  command: bash scripts/gpu_check.sh --stage 2
       carry:   ["$CARRY/2"]
       timeout_s: 590
Outputs of call 2 come back from \$OUT (summary.txt, device.txt, pytest.log, benchmark.md).
EOF
}

# --------------------------------------------------- GPU machine: --stage 1/2
store() {  # $1: the carried folder of this call
  mkdir -p "$STORE"
  if [ -d "$1" ] && [ -n "$(ls -A "$1")" ]; then
    cp -f "$1"/* "$STORE"/
    echo "gpu_check: stored $(ls "$1" | wc -l) file(s) from $1 in $STORE"
  else
    fail "nothing carried in $1: name it in this run call's carry list"
  fi
  ls -la "$STORE"
}

install() {
  local parts wheel want=() f dist
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || fail "the carried wheels are for CPython 3.12; $PY is $("$PY" --version 2>&1)"
  parts=("$STORE"/mlx_cuda_13-*.whl.part-*)
  [ -e "${parts[0]}" ] || fail "no parts of the CUDA wheel in $STORE: run --stage 1 first"
  wheel=${parts[0]%.part-*}
  [ -e "$wheel.part-00" ] || fail "part 1 of the CUDA wheel is not in $STORE: the \
machine was released after call 1 (or it was not made); make both calls again"
  cat "${parts[@]}" >"$wheel"
  (cd "$STORE" && sha256sum -c SHA256SUMS) \
    || fail "the joined CUDA wheel does not match its checksum: a part is missing or cut"
  for f in "$STORE"/*.whl; do  # install only what the machine lacks (and MLX)
    dist=$(basename "$f" | cut -d- -f1)
    case "$dist" in
      mlx | mlx_cuda_13) want+=("$f") ;;
      *) "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" \
           2>/dev/null || want+=("$f") ;;
    esac
  done
  rm -rf "$SITE" && mkdir -p "$SITE"
  echo "gpu_check: installing into $SITE: $(printf '%s ' "${want[@]##*/}")"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "${want[@]}"
  else  # a wheel is a zip laid out as site-packages
    echo "gpu_check: no pip here; unpacking the wheels instead"
    for f in "${want[@]}"; do "$PY" -m zipfile -e "$f" "$SITE"; done
  fi
  # libmlx finds the CUDA libraries through an rpath relative to its own site dir
  local nv
  nv=$("$PY" -c 'import nvidia, sys; sys.stdout.write(list(nvidia.__path__)[0])' \
    2>/dev/null || true)
  if [ -n "$nv" ] && [ ! -e "$SITE/nvidia" ]; then ln -s "$nv" "$SITE/nvidia"; fi
  # Tests start `python -m src.X` with PYTHONPATH set to the repository alone:
  # a .pth in the user site puts $SITE on their path too (before site-packages).
  local user
  user=$("$PY" -m site --user-site)
  mkdir -p "$user" && echo "$SITE" >"$user/gpu_check.pth"
  echo "gpu_check: $SITE added to every $PY through $user/gpu_check.pth"
}

cuda_lib_path() {  # every nvidia/*/lib of the machine, for libmlx's loader
  PYTHONPATH="" "$PY" - <<'EOF' 2>/dev/null || true
import glob, os
try:
    import nvidia
    dirs = [d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))]
    print(":".join(sorted(dirs)))
except ImportError:
    pass
EOF
}

report_imports() {  # which of the project's imports this machine lacks
  "$PY" - <<'EOF' | tee "$OUT/imports.txt"
import importlib
need = ["mlx.core", "numpy", "yaml", "sentencepiece", "tokenizers", "safetensors",
        "tqdm", "mlx_lm", "transformers", "torch", "pytest"]
missing = []
for name in need:
    try:
        mod = importlib.import_module(name)
        print(f"import {name}: ok {getattr(mod, '__version__', '')}")
    except Exception as e:  # an ImportError, or a library that fails to load
        missing.append(name)
        print(f"import {name}: MISSING ({type(e).__name__}: {e})")
print("missing imports: " + (", ".join(missing) if missing else "none"))
EOF
}

check_device() {  # fail loudly, and at once, unless MLX computes on a GPU in bf16
  "$PY" - <<'EOF' 2>&1 | tee "$OUT/device.txt"
import sys
import src  # noqa: F401  (the project's import order)
import mlx.core as mx
from src.backend import policy
device = mx.default_device()
print(f"mlx {mx.__version__}: default device {device}")
if device.type != mx.DeviceType.gpu:
    print(f"gpu_check: FAIL: mx.default_device() is {device}, not a GPU: "
          "MLX's CUDA build is not the mlx imported here", file=sys.stderr)
    sys.exit(3)
dtype = policy.compute_dtype("auto")
print(f"training.precision auto -> compute dtype {dtype}")
if dtype != mx.bfloat16:
    print(f"gpu_check: FAIL: compute dtype {dtype} on a GPU, expected bf16",
          file=sys.stderr)
    sys.exit(3)
a = mx.random.normal((1024, 1024)).astype(mx.bfloat16)
mx.eval(a @ a)
print("bf16 matmul on the GPU: ok")
try:
    import torch
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}: "
          + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"))
except ImportError:
    print("torch: not importable")
EOF
}

step() {  # name, limit seconds, command...: run, log, time, note the outcome
  local name=$1 limit=$2 tic rc=0
  shift 2
  tic=$(date +%s)
  # SIGINT first: pytest then still prints its summary and writes its XML
  timeout -s INT -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$name: exit $rc in $(($(date +%s) - tic)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || FAILED+=("$name")
}

check() {
  FAILED=()
  : >"$OUT/summary.txt"
  report_imports
  grep -q '^import mlx.core: ok' "$OUT/imports.txt" \
    || fail "mlx does not import (see $OUT/imports.txt)"
  check_device || fail_from "$OUT/device.txt"
  command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
  if [ "$RUN_TESTS" -eq 1 ]; then
    if grep -q '^import pytest: ok' "$OUT/imports.txt"; then
      step pytest "$TEST_S" "$PY" -m pytest -q -p no:cacheprovider -rfE \
        --durations=10 --junitxml="$OUT/pytest.xml" "${TESTS[@]}"
    else
      echo "pytest: not run, pytest does not import" | tee -a "$OUT/summary.txt"
      FAILED+=(pytest)
    fi
  fi
  if [ "$RUN_BENCH" -eq 1 ]; then
    if "$PY" scripts/benchmark.py --help 2>/dev/null | grep -q -- '--precision'; then
      step benchmark "$BENCH_S" "$PY" scripts/benchmark.py --shapes medium \
        --impls ours torch --precision bf16 --torch-device cuda --rounds 3 \
        --warmup 2 --out "$OUT/benchmark"
    else
      # TODO(issue 18): scripts/benchmark.py has no --precision / --torch-device /
      # medium (~125M) shape yet: this is fp32 MLX on the GPU against torch on the CPU.
      echo "benchmark: TODO: no bf16 / torch-on-GPU / ~125M options yet" | tee -a "$OUT/summary.txt"
      step benchmark "$BENCH_S" "$PY" scripts/benchmark.py --shapes b \
        --impls ours torch --rounds 3 --warmup 2 --out "$OUT/benchmark"
    fi
  fi
  echo "gpu_check: failed steps: ${FAILED[*]:-none}" | tee -a "$OUT/summary.txt"
  [ ${#FAILED[@]} -eq 0 ] || exit 3
}

if [ "$MODE" = prepare ]; then
  prepare
  exit 0
fi
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ "$INSTALL" -eq 1 ]; then
  store "$CARRY/$STAGE" 2>&1 | tee "$OUT/stage$STAGE.log" || fail_from "$OUT/stage$STAGE.log"
  [ "$STAGE" = 2 ] || exit 0
  install 2>&1 | tee "$OUT/install.log" || fail_from "$OUT/install.log"
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  LIBS=$(cuda_lib_path)
  [ -z "$LIBS" ] || export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else  # the mlx already importable here (a venv, or an earlier install)
  [ "$STAGE" = 2 ] || die "--no-install is for --stage 2"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
check

#!/usr/bin/env bash
# One call on a bare CUDA machine (Python 3.12 and torch, transformers; no DeepSpeed, no network), in under 8 minutes:
# installs the wheels prepared beforehand, then runs the gpu-marked tests (tests/test_gpu.py) and
# benchmarks/gpu_check.py, and writes everything under the folder the caller names.
#
#   python benchmarks/gpu_wheels.py prepare          before, where there is network: fills .whl/ (git-ignored, < 60 MB)
#   bash benchmarks/gpu_kit.sh OUT                   on the GPU machine, from a copy of the repository with .whl/ in it
#   bash benchmarks/gpu_kit.sh OUT --smoke-cpu       the rehearsal on a CPU: tiny model, the gpu tests on the CPU
#
# OUT gets install.log, gpu_tests.log (+ gpu_tests.xml), gpu_check.md (the tables), gpu_check.log (its stderr) and
# summary.txt; the exit status is 0 when every part passed. Environment: PYTHON (default python3), EARLYBERT_WHEELS
# (default .whl), KIT_SECONDS (default 480: the whole kit's budget), EARLYBERT_KIT_SITE (where the wheels go, put on
# PYTHONPATH; default a fresh folder under TMPDIR, removed at the end). DeepSpeed's ops are never compiled (DS_BUILD_OPS=0):
# the project's fused paths fall back to torch where a kernel is absent.
set -uo pipefail

usage="usage: bash benchmarks/gpu_kit.sh OUT_DIR [--smoke-cpu]"
out="" smoke=0
for arg in "$@"; do
    case "$arg" in
        --smoke-cpu) smoke=1 ;;
        -*) echo "gpu_kit: unknown option $arg; $usage" >&2; exit 2 ;;
        *) if [[ -n $out ]]; then echo "gpu_kit: one OUT_DIR only; $usage" >&2; exit 2; fi; out=$arg ;;
    esac
done
[[ -n $out ]] || { echo "gpu_kit: no OUT_DIR given; $usage" >&2; exit 2; }
[[ $out = /* ]] || out="$PWD/$out"
cd "$(dirname "$0")/.."

start=$SECONDS
budget=${KIT_SECONDS:-$((smoke ? 1800 : 480))}  # the rehearsal runs the gpu tests on a (slow) CPU
python=${PYTHON:-python3}
wheels=${EARLYBERT_WHEELS:-.whl}
if [[ ! -d $wheels ]]; then
    echo "gpu_kit: no wheel folder $wheels: run 'python benchmarks/gpu_wheels.py prepare' where there is network" \
         "and bring the folder along (git ignores it)" >&2
    exit 2
fi
wheels=$(cd "$wheels" && pwd)
mkdir -p "$out" || exit 2
if [[ -n ${EARLYBERT_KIT_SITE:-} ]]; then
    site=$EARLYBERT_KIT_SITE
else
    site=$(mktemp -d "${TMPDIR:-/tmp}/earlybert-kit.XXXXXX")
    trap 'rm -rf "$site"' EXIT  # the kit made it, the kit removes it
fi
left() { echo $((budget - (SECONDS - start))); }

: > "$out/summary.txt"
status=0
report() {  # name, exit code: one line in summary.txt
    local verdict=passed
    if [[ $2 -eq 124 || $2 -eq 137 ]]; then verdict="stopped at its time limit"; elif [[ $2 -ne 0 ]]; then verdict="failed (exit $2)"; fi
    [[ $2 -eq 0 ]] || status=1
    echo "$1: $verdict ($((SECONDS - start)) s into the kit)" | tee -a "$out/summary.txt"
}

"$python" benchmarks/gpu_wheels.py install --dest "$wheels" --target "$site" > "$out/install.log" 2>&1
rc=$?
report "install ($wheels -> $site)" $rc
if [[ $rc -ne 0 ]]; then cat "$out/install.log" >&2; exit 1; fi

export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH" DS_BUILD_OPS=0
export EARLYBERT_WIKI_DUMP="$wheels/enwiki-sample-pages-articles.xml.bz2"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [[ $smoke == 1 ]]; then
    export DS_ACCELERATOR=cpu EARLYBERT_GPU_TESTS_ON_CPU=1
    check_args=(--smoke-cpu --steps 3 --warmup 1 --seqs 32 --tokens-per-step 64)
else
    export DS_ACCELERATOR=cuda  # tests/conftest.py would otherwise put DeepSpeed on its CPU accelerator
    check_args=()
fi
"$python" - <<'EOF' >> "$out/install.log" 2>&1
import deepspeed, torch, transformers
print(f"python imports: torch {torch.__version__} (CUDA {torch.version.cuda}, available {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__} from {deepspeed.__file__}")
EOF
report "imports (install.log's last line)" $?

# The tests first: on a GPU at most 3 minutes, leaving the rest (at least 150 s) to gpu_check.
tests_limit=$(( $(left) - 150 ))
(( smoke || tests_limit < 180 )) || tests_limit=180
if (( tests_limit < 30 )); then  # (timeout 0 would mean no limit at all)
    echo "gpu tests: not run, only $(left) s of the kit's $budget s left" | tee -a "$out/summary.txt"
    status=1
else
    timeout "$tests_limit" "$python" -m pytest -m gpu tests/test_gpu.py -q -ra -s \
        -p no:cacheprovider --junitxml "$out/gpu_tests.xml" > "$out/gpu_tests.log" 2>&1
    report "gpu tests (gpu_tests.log)" $?
fi

# gpu_check starts no run after --budget-s; a run started before then may take ~30 s more at seq 512.
check_budget=$(( $(left) - 60 ))
if (( check_budget < 30 )); then
    echo "gpu_check: not run, only $(left) s of the kit's $budget s left" | tee -a "$out/summary.txt"
    status=1
else
    timeout $(( $(left) - 5 )) "$python" benchmarks/gpu_check.py --budget-s "$check_budget" "${check_args[@]}" \
        > "$out/gpu_check.md" 2> "$out/gpu_check.log"
    report "gpu_check (gpu_check.md, stderr in gpu_check.log)" $?
fi
echo "kit: $((SECONDS - start)) s in all; results in $out" | tee -a "$out/summary.txt"
exit $status

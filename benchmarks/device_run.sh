#!/usr/bin/env bash
# One call on the lent GPU machine (device tool): install the carried wheels (../shared/device/wheels.sh), then run
# the named stages in order, each under its own time limit, with its log and JSON under $OUT.
# Usage there, from the repository root, carrying .whl:  bash benchmarks/device_run.sh STAGE[:SECONDS] ...
# (.whl: ../shared/device/wheels.sh torchao zarr==3.1.6 numcodecs donfig google-crc32c cramjam lz4 isal blosc2 blake3; zarr pinned:
# 3.4 needs msgspec, which is not carried, and collection fails on its import; blosc2's library
# serves the CPU byte planes, and five CPU tests fail on the GPU host without it.)
# Stages: tests (the whole suite, CUPYCODEC_REQUIRE_GPU=1, so no GPU test can skip), gpu (bench_gpu --quick),
# torch (bench_torch), ckpt (bench_checkpoint), zarr (bench_zarr --device cuda), fuzz (fuzz_gpu, 8 cases at once),
# fuzzsan (fuzz_gpu under compute-sanitizer memcheck), ab[=DIR] (latency_ab against bench_old/ or DIR), spread (latency_spread), offload
# (bench_offload), prof (profile_latency), fwd (profile_forward), sweep (sweep_gemv), ncu (Nsight Compute on
# benchmarks/gemv_once.py), multi (the two-GPU tests) and multibench (bench_multigpu; MULTI_ARGS), pytest=EXPR
# (tests matching -k EXPR), stress (stress_wide.py: processes sharing the GPU; STRESS_ARGS), py=SCRIPT
# (benchmarks/SCRIPT with PY_ARGS).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 CUPYCODEC_REQUIRE_GPU=1
# compiled now, so that a carried package's SyntaxWarnings (torchao's) are not raised at import under -W error
python3 -m compileall -q /tmp/site >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import torch, cupy, transformers; print("torch", torch.__version__, "cupy", cupy.__version__,
"transformers", transformers.__version__, torch.cuda.get_device_name())'
for arg in "$@"; do
  stage=${arg%%:*}; secs=${arg#*:}; [ "$secs" = "$arg" ] && secs=300
  echo "=== $stage (limit ${secs}s) $(date +%T)"
  t0=$SECONDS
  case $stage in
    tests) # -v: each result is a line with its test's name, so a run cut by the limit still names its failures
           timeout -k 5 "$secs" python3 -m pytest -p no:cacheprovider -p no:benchmark -v -n ${TEST_WORKERS:-8} \
             --timeout 240 -rfEs --durations=20 ${TEST_ARGS:-} tests >"$OUT/tests.log" 2>&1
           rc=$?; grep -E " (FAILED|ERROR) " "$OUT/tests.log" | head -20; grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 ;;
    stress) # processes sharing the GPU, each looping a compressed model's scenario (stress_wide.py; STRESS_ARGS)
            timeout -k 5 "$secs" python3 benchmarks/stress_wide.py \
              ${STRESS_ARGS:---procs 8 --seconds 20 --variants wide,perlayer --modes int8,int8+entropy} \
              --json "$OUT/stress_wide.json" >"$OUT/stress_wide.log" 2>&1; rc=$?; cut -c1-300 "$OUT/stress_wide.log" ;;
    py=*) # any script of benchmarks/ (PY_ARGS), its output in $OUT/NAME.log
          script=${stage#py=}; timeout -k 5 "$secs" python3 "benchmarks/$script" ${PY_ARGS:-} \
            >"$OUT/${script%.py}.log" 2>&1; rc=$?; tail -60 "$OUT/${script%.py}.log" ;;
    pytest=*) timeout -k 5 "$secs" python3 -m pytest -p no:cacheprovider -p no:benchmark -q -n ${PYTEST_WORKERS:-4} --timeout 240 -rfEs \
             -k "${stage#pytest=}" tests >"$OUT/pytest${PYTEST_TAG:-}.log" 2>&1; rc=$?
             grep -E "^(FAILED|ERROR) |passed|failed|node down|Fatal Python" "$OUT/pytest${PYTEST_TAG:-}.log" | tail -12 ;;
    gpu) timeout -k 5 "$secs" python3 benchmarks/bench_gpu.py --quick ${GPU_ARGS:-} --json "$OUT/bench_gpu.json" \
           >"$OUT/bench_gpu.log" 2>&1; rc=$?; tail -40 "$OUT/bench_gpu.log" ;;
    torch) timeout -k 5 "$secs" python3 benchmarks/bench_torch.py ${TORCH_ARGS:-} --json "$OUT/bench_torch.json" \
             >"$OUT/bench_torch.log" 2>&1; rc=$?; tail -40 "$OUT/bench_torch.log" ;;
    ckpt) timeout -k 5 "$secs" python3 benchmarks/bench_checkpoint.py ${CKPT_ARGS:---models tinyllama --device cuda:0} \
            --json "$OUT/bench_checkpoint.json" >"$OUT/bench_checkpoint.log" 2>&1; rc=$?
          tail -20 "$OUT/bench_checkpoint.log" ;;
    zarr) timeout -k 5 "$secs" python3 benchmarks/bench_zarr.py --device cuda ${ZARR_ARGS:-} --json "$OUT/bench_zarr.json" \
            >"$OUT/bench_zarr.log" 2>&1; rc=$?; tail -20 "$OUT/bench_zarr.log" ;;
    fuzz) timeout -k 5 "$secs" python3 benchmarks/fuzz_gpu.py --budget-s $((secs - 20)) --trials 40 --jobs 8 \
            ${FUZZ_ARGS:-} --json "$OUT/fuzz_gpu.json" >"$OUT/fuzz_gpu.log" 2>&1; rc=$?; tail -30 "$OUT/fuzz_gpu.log" ;;
    fuzzsan) timeout -k 5 "$secs" python3 benchmarks/fuzz_gpu.py --budget-s $((secs - 20)) --sanitizer --trials 6 \
               --jobs 8 ${FUZZSAN_ARGS:-} --json "$OUT/fuzz_sanitizer.json" >"$OUT/fuzz_sanitizer.log" 2>&1; rc=$?
             tail -30 "$OUT/fuzz_sanitizer.log" ;;
    ab|ab=*) # small-array latency against an older checkout carried as a directory (default bench_old/; made with
        # git archive REV cupycodec | tar -x -C DIR), pinned to one core as in the pre-engine runs (RESULTS.md, runs 13-14)
        old=bench_old; [ "$stage" != ab ] && old=${stage#ab=}
        timeout -k 5 "$secs" taskset -c 3 python3 benchmarks/latency_ab.py --old "$old" --rounds ${AB_ROUNDS:-3} \
          --json "$OUT/latency_ab_$old.json" >"$OUT/latency_ab_$old.log" 2>&1; rc=$?; tail -22 "$OUT/latency_ab_$old.log" ;;
    spread) timeout -k 5 "$secs" python3 benchmarks/latency_spread.py --json "$OUT/latency_spread.json" >"$OUT/latency_spread.log" 2>&1
            rc=$?; cat "$OUT/latency_spread.log" ;;
    prof) timeout -k 5 "$secs" python3 benchmarks/profile_latency.py ${PROF_ARGS:-} >"$OUT/profile_latency.log" 2>&1
          rc=$?; tail -60 "$OUT/profile_latency.log" ;;
    fwd) timeout -k 5 "$secs" python3 benchmarks/profile_forward.py ${FWD_ARGS:-} >"$OUT/profile_forward.log" 2>&1
         rc=$?; grep -E "us/call|wall| us$" "$OUT/profile_forward.log"; grep -A6 "ms per token\|ms per step" "$OUT/profile_forward.log"
         grep -A12 "CUDA API calls" "$OUT/profile_forward.log" ;;
    multi) # two GPUs (issue 14): the two-GPU tests, with multicast off as the device notes ask
           NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUPYCODEC_GPUS=2 \
             timeout -k 5 "$secs" python3 -m pytest -p no:cacheprovider -p no:benchmark -v --timeout 240 -rfEs \
             tests/gpu/test_multi_gpu.py "tests/gpu/test_engine.py::test_second_device_whatever_is_current" \
             >"$OUT/multi_tests.log" 2>&1; rc=$?; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/multi_tests.log" | tail -15 ;;
    multibench) NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 timeout -k 5 "$secs" \
             python3 benchmarks/bench_multigpu.py ${MULTI_ARGS:-} --json "$OUT/bench_multigpu.json" \
             >"$OUT/bench_multigpu.log" 2>&1; rc=$?; tail -20 "$OUT/bench_multigpu.log" ;;
    sweep) timeout -k 5 "$secs" python3 benchmarks/sweep_gemv.py --json "$OUT/sweep_gemv.json" >"$OUT/sweep_gemv.log" 2>&1
           rc=$?; grep -o '"shape[^}]*"best[^}]*' "$OUT/sweep_gemv.log" | cut -c1-200 ;;
    ncu) timeout -k 5 "$secs" ncu --clock-control none --target-processes all --kernel-name regex:"gemv|gemm|cutlass|sm90" \
           --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
           --section LaunchStats python3 benchmarks/gemv_once.py ${NCU_ARGS:-} >"$OUT/ncu_gemv.log" 2>&1; rc=$?
         grep -E "^  [a-z_]+.*\(|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|Stall|One or More" \
           "$OUT/ncu_gemv.log" | head -80 ;;
    offload) timeout -k 5 "$secs" python3 benchmarks/bench_offload.py ${OFFLOAD_ARGS:-} --json "$OUT/bench_offload.json" \
               >"$OUT/bench_offload.log" 2>&1; rc=$?; tail -20 "$OUT/bench_offload.log" ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
  echo "=== $stage rc=$rc in $((SECONDS - t0))s"
done

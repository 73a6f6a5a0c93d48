#!/usr/bin/env bash
# Planned H200 runs, one stage per device command (each ends well inside the 10-minute limit;
# every step has its own timeout and writes under $OUT, so a stage that runs long still
# returns what it measured). Copy what comes back into experiments/results/.
#
#   bash experiments/device_runs.sh kernels    # kernel GPU tests, full kernel table, fused kernel (~9 min)
#   bash experiments/device_runs.sh asm        # w4a16 inline-PTX nibbles: GPU tests + timing against the defaults (~5 min)
#   bash experiments/device_runs.sh normquant  # fused RMSNorm + quantization: kernel vs XLA, then end to end (~7 min)
#   bash experiments/device_runs.sh actquant   # int8 GEMM quantizing its own input: GPU tests, kernel times, gamma 3 end to end (~7 min)
#   bash experiments/device_runs.sh asmtune    # tile sweep for the asm w4a16 path, M 1-64 (~8 min)
#   bash experiments/device_runs.sh gemv       # small-M GEMM paths + gemv_magic config sweep (~9 min)
#   bash experiments/device_runs.sh b1kern     # batch-1 step: Pallas attention below batch 8, cache update by slice (~8 min)
#   bash experiments/device_runs.sh xpad       # x of < 8 rows unpadded into the Mosaic GEMM (TMA zero fill): GPU test + 8B AR + b1 kernel summary (~6.5 min)
#   bash experiments/device_runs.sh hadsplit   # online Hadamard: dense vs dense_split, transform alone + rotated 8B AR (~5.5 min)
#   bash experiments/device_runs.sh profile    # device time by kernel: AR step, gamma-3 and auto cycles (~4 min)
#   bash experiments/device_runs.sh sweep8b    # end-to-end sweep, Llama-3-8B shapes, batch 1/4/16/64 (~8 min)
#   bash experiments/device_runs.sh sweep8b_more  # the same at batch 2/8/32/128 (~8 min)
#   bash experiments/device_runs.sh lmhead     # AR and gamma 3 with an int4 lm_head, batch 1/4/16 (~6 min)
#   bash experiments/device_runs.sh compile    # 8B compile and step times: XLA autotuning on / cached / off (~6 min)
#   bash experiments/device_runs.sh tokamax    # tokamax's Hopper int4 matmul as a peer (run with carry=["wheels"]; ~6 min)
#   bash experiments/device_runs.sh sweepsmall # trained default model sweep (~5 min)
#   bash experiments/device_runs.sh attention  # read-only attention GPU test + the full attention grid (~9 min)
#   bash experiments/device_runs.sh longmodel  # train a 32k-context variant of the default model, then draft acceptance + timed QSpec at 2k-32k (~9.5 min)
#   bash experiments/device_runs.sh windowfix  # re-time the windowed drafts (cost_model window bug at ed34442) + the fused quantization kinds (~9 min)
#   bash experiments/device_runs.sh longe2e    # measured end to end at long context: AR vs QSpec with a windowed draft, 8B shapes, 32 x 8k (~5 min)
#   bash experiments/device_runs.sh longe2e32  # the same at 16 x 32k (~8 min)
#   bash experiments/device_runs.sh longe2e4k  # the 4 + 4092 window end to end at 32 x 8k and 16 x 32k (~9.5 min)
#   bash experiments/device_runs.sh longnk     # issue 9 in the nk layout: QSpec 2k window at 16 x 32k, AR + QSpec 1k window at 32 x 8k (~9 min)
#   bash experiments/device_runs.sh longe2e2k  # the 4 + 2044 window end to end at 16 x 32k (~5.5 min)
#   bash experiments/device_runs.sh longwin    # window sizes 2k / 4k for the 8B draft at 8k-32k (reuses longctx_h200.jsonl; ~5 min)
#   bash experiments/device_runs.sh stream     # issue-6 diagnostic: Pallas read-only / read + unpack kernels vs XLA (~2 min)
#   bash experiments/device_runs.sh chunktest  # GPU test: chunked prefill through the attention kernel (~2 min)
#   bash experiments/device_runs.sh warmcompile  # 8B compile times cold vs a warm persistent cache (two processes; ~5.5 min)
#   bash experiments/device_runs.sh normfold   # issue 8: the draft's norm folded into its quantization scale vs default, w4a8 / w4a16 AR, 1B + 8B, batch 1 / 16 (~8 min)
#   bash experiments/device_runs.sh combine    # issue 7: the all-splits-at-once combine: GPU attention tests, batch 1-8 kernel times, batch-1 split sweep (~9.5 min)
#   bash experiments/device_runs.sh splits248  # issue 7 after the full-wave batch-1 splits: batch 2 / 4 / 8 split sweep with the cheap combine + batch 1 / 8 grid vs peers (~9 min)
#   bash experiments/device_runs.sh hadamardk  # the one-kernel online Hadamard (impl "pallas"): GPU tests, transform alone vs the GEMM form, 8B rotated AR b1/16 (~8 min)
#   bash experiments/device_runs.sh prof16rot  # device time by kernel of a rotated vs plain 8B batch-16 w4a16 step (~5 min)
#   bash experiments/device_runs.sh vheads     # rotated 8B w4a16 AR b1/16: o_proj's online Hadamard across heads only (v_proj holds the rest) vs the full transform (~3.5 min)
#   bash experiments/device_runs.sh retime25   # new attention splits (b1 short caches, b2) + verify norm fold auto vs on (QSpec b1 gamma 3) (~8.5 min)
#   bash experiments/device_runs.sh retime24   # GPU attention tests (all 63) + 8B w4a16 AR and gamma 3 end to end at batch 1 / 16 with the new attention defaults (~9.5 min)
#   bash experiments/device_runs.sh normscale  # verify-mode RMSNorm folded into the GEMM epilogue (quant.NORM_SCALE_FOLD) vs default: 8B b1/16, rotated 8B b1, 1B b1/16 w4a16 AR (~9 min)
#   bash experiments/device_runs.sh attnsweep1 # batch-1 attention config sweep incl. 256-key blocks (issue 7; ~5 min)
#   bash experiments/device_runs.sh kernels70b # the kernel table on the Llama-3-70B layer shapes (issue 6's larger model; ~6 min)
#   bash experiments/device_runs.sh hadamard   # XLA's online Hadamard + quantization before down_proj, and the transform alone (~2 min)
#   bash experiments/device_runs.sh mgpu       # Mosaic GPU kernel: GPU tests + tile sweep on the large 8B shapes (~9 min)
#   bash experiments/device_runs.sh mgpuws     # warp-specialized Mosaic kernel: correctness + time, 8B shapes (~5.5 min)
#   bash experiments/device_runs.sh mgpucompile  # int4 [N, K] layout: 8B compile time, lower vs compile, autotuning off (~5 min)
#   bash experiments/device_runs.sh mgpue2e    # int4 [N, K] vs stored layout end to end: AR + gamma 3, batch 1/4/16 (~9.5 min)
#   bash experiments/device_runs.sh mgpue2e1   # the same at batch 1 only, one call (~9.5 min)
#   bash experiments/device_runs.sh mgpue2e2   # after the per-shape kernel functions: model GPU test, nk compile, nk at batch 1 (~9 min)
#   bash experiments/device_runs.sh mgpue2e3   # both layouts at batch 16 and 4 (~8.5 min)
#   bash experiments/device_runs.sh mgpum64    # Mosaic kernel at M 16-64 vs XLA over int4 [N, K] (the nk path above MGPU_MAX_M) and Triton (~9 min)
#   bash experiments/device_runs.sh m64had     # mgpum64's default-config half + hadamard2 at the 8B widths (~8.5 min)
#   bash experiments/device_runs.sh b16flags   # batch-16 AR + gamma 3 (nk, verify on Mosaic) + the xlaflags sets (~9.5 min)
#   bash experiments/device_runs.sh regs2      # Mosaic GPU tests (model, auto layout, configs) + the mgpuregs sweep (~8.5 min)
#   bash experiments/device_runs.sh tune64     # Mosaic model-level GPU tests + the config sweep at M = 64 (~7.5 min)
#   bash experiments/device_runs.sh b16split   # kernel GPU tests at M 24-64 + batch-16 AR / gamma 3 (nk) after the M > 32 split rule (~5 min)
#   bash experiments/device_runs.sh profile16  # device time by kernel, batch-16 AR step vs gamma-3 cycle, nk layout (~4 min)
#   bash experiments/device_runs.sh ws4        # mgpuws cut to ~4.5 min (M 1 / 16)
#   bash experiments/device_runs.sh nq16       # batch-16 gamma 3 with the fused rmsnorm / o_proj-input quantization kernels (~3 min)
#   bash experiments/device_runs.sh mgpum256  # Mosaic GEMM at M 65-256: GPU tests, per-layer vs XLA and Triton (~6 min)
#   bash experiments/device_runs.sh mgpum256e2e  # 8B b256 AR / b64 QSpec gamma 1 with MGPU_MAX_M 64 vs 256 (~6 min)
#   bash experiments/device_runs.sh resnorm  # fused epilogue + residual + RMSNorm kernel: GPU tests, 8B b1/16 off vs on, b1 profile (~8 min)
#   bash experiments/device_runs.sh mgpuauto # kernel_dispatch.mgpu_max_m's table vs one limit of 64: GPU test (160-row verify), 8B b256 AR + b64 gamma 1 (~7 min)
#   bash experiments/device_runs.sh resnorm2 # the fused residual + RMSNorm kernel at 4 / 8 / 16 warps: GPU tests, 8B b1 w4a16 vs off (~4.5 min)
#   bash experiments/device_runs.sh bigm     # Mosaic config sweep at M 128 / 256, w4a16: wider tiles, x's rows split over CTAs (tile_m), K steps (~9 min)
#   bash experiments/device_runs.sh bigm8    # the same for w4a8, after the tile_m GPU tests (~10 min)
#   bash experiments/device_runs.sh bigmauto # the retuned 128 / 256-row configs: GPU tests + 8B batch 256 / 64 / 128 AR and gamma 1 (~9 min)
#   bash experiments/device_runs.sh defaults256 # GPU tests + per-shape times of the default Mosaic configs at 128 / 256 rows vs XLA (~5 min)
#   bash experiments/device_runs.sh cachewrite3 # K/V writes per layer vs per step at batch 1 / 4, two alternating runs each (~6 min)
#   bash experiments/device_runs.sh attnst3    # GPU attention tests + batch 8 / 32 / 64 grid points after the 3-stage rule (~8 min)
#   bash experiments/device_runs.sh attnsweep64 # attention configs at batch 64 x 8k / 32k and batch 1 x 32k, T 1 (~6.5 min)
#   bash experiments/device_runs.sh attnsweep8  # attention configs at batch 8 x 2k (T 1 / 4 / 8) and 8 x 8k (~3 min)
#   bash experiments/device_runs.sh xlaflags3   # 8B AR at batch 1 / 16 with XLA's PDL and block-level fusion flags (~6 min)
#   bash experiments/device_runs.sh sweepgrid8b  # issue 8's full grid (all modes, batch 1-256), resumable: run it until done (~9.5 min per call)
#   bash experiments/device_runs.sh coldstart  # first / second generate call in a fresh process: w4a16 vs QSpec gamma 3 vs auto, 8B batch 1 / 16 (~9 min)
#   bash experiments/device_runs.sh readfloor  # the read floor by size: XLA's row reduction over each 8B / 70B GEMM's weight bytes (~2 min)
#   bash experiments/device_runs.sh attnfloor  # attention at batch 1-8, T 1, with the read-only floor (XLA's reduction over the KV bytes) (~5 min)
#   bash experiments/device_runs.sh gputests   # GPU tests cut short at 74ec0d1 (attention, Triton kernels) + the Mosaic smem_a / model tests (~9 min)
#   bash experiments/device_runs.sh kernels1b  # the Llama-3.2-1B layer's GEMMs alone: Mosaic w4a16 / w4a8, XLA bf16, M 1-256 (~3 min)
#   bash experiments/device_runs.sh profile1b  # 1B shapes: device time by kernel, w4a16 / w4a8 steps and a gamma-3 cycle, batch 1 / 16 (~6 min)
#   bash experiments/device_runs.sh sweepgrid1b  # the same for the Llama-3.2-1B shapes (--min-time 1.0: at least 1 s of timed runs per point)
#   bash experiments/device_runs.sh attnsweep24 # attention GPU tests + configs at batch 2 / 4 and 8 x 32k + the batch 1 / 8 grid vs peers (~8 min)
#   bash experiments/device_runs.sh defaults70b # 70B default-config GPU tests + Mosaic vs XLA's int4 [N, K] GEMM at M 64-256 (the dispatch rule) (~6 min)
#   bash experiments/device_runs.sh sweepgrid8bsmall  # the 8B grid's batch 1-8 rows with --min-time 1.0, resumable (~9.5 min)
#   bash experiments/device_runs.sh pdl        # Mosaic GEMMs with programmatic dependent launch (wait / weight prefetch): support, GPU tests, per-GEMM times (~8 min)
#   bash experiments/device_runs.sh pdle2e     # 8B w4a16 AR at batch 1 / 16 with PDL off / wait / prefetch (~4.5 min)
#   bash experiments/device_runs.sh kernels    # issue 6's full 8B kernel table (all M, Mosaic + Triton + XLA peers) after the kernel GPU tests (~9 min)
#   bash experiments/device_runs.sh outmn      # Mosaic GEMMs storing transposed partial sums (fusable epilogue): GPU tests + batch 1/16 end to end on/off (~9 min)
#   bash experiments/device_runs.sh cachewrite # K/V written once per step (read-only forward) vs per layer: AR batch 1/16/64 + 32 x 8k (~9.5 min)
#   bash experiments/device_runs.sh hlodump    # the decode programs' optimized HLO (AR, gamma 3; batch 1 / 16), gzipped, to read offline (~4 min)
#   bash experiments/device_runs.sh rotate     # what a rotated conversion's online Hadamards cost an 8B step: AR batch 1 / 16 with / without + a profile (~6.5 min)
#   bash experiments/device_runs.sh autob1     # w4a16 AR vs gamma="auto" at batch 1 / 4 after the read-only XLA attention fix (31562b0) (~5 min)
#   bash experiments/device_runs.sh cachewrite2 # batch-1 profiles per-layer vs per-step writes + the GPU cache-write test (~3 min)
#   bash experiments/device_runs.sh diag       # issue 6: GEMM vs kernel alone vs TMA ring alone (read-only probe), read-only structure sweep (~9 min)
#   bash experiments/device_runs.sh lmhead2    # int4 lm_head A/B at batch 1 / 16 (nk, transposed store) + batch-1 profile (~7.5 min)
#   bash experiments/device_runs.sh outmn2     # outmn after the jax-0.11 fix: GPU tests + batch 1 / 16 AR on / off (~5.5 min)
#   bash experiments/device_runs.sh persist    # persistent-CTA Mosaic kernel: GPU tests + config sweep vs the default (~9.5 min)
#   bash experiments/device_runs.sh smema      # shared-memory-operand Mosaic kernel: GPU tests + config sweep vs the default (~9.5 min)
#   bash experiments/device_runs.sh mgpuregs   # Mosaic kernel with 64/128-wide K steps and deeper rings (~9 min)
#   bash experiments/device_runs.sh hadamard2  # online Hadamard: butterfly vs GEMM form, M 1-4096 (~4 min)
#   bash experiments/device_runs.sh xlaflags   # batch-1 AR under XLA command-buffer (CUDA graph) flag sets (~7 min)
#   bash experiments/device_runs.sh longctx8b  # 8B-shaped step costs at 2k-32k: AR, verify, full / windowed / windowed + layer-skipping drafts (~8 min)
#
# Needs: $OUT (the device tool sets it), PYTHONPATH=. (set here), the commit hash in $COMMIT
# (the device copy has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
: "${OUT:?set OUT}"
COMMIT="${COMMIT:-unknown}"
stage="${1:?stage: kernels | asm | asmtune | actquant | normquant | gemv | many | verifym | profile | sweep8b | sweep8b_more | lmhead | compile | tokamax | sweepsmall | attention | longmodel | longctx8b | windowfix | smallbatch | longe2e | longe2e32 | longe2e4k | longwin | stream | chunktest | warmcompile | longe2e2k | attnsweep1 | kernels70b | hadamard | mgpu | mgpuws | mgpucompile | mgpue2e | mgpue2e1 | mgpue2e2 | mgpue2e3 | mgpum64 | hadamard2 | xlaflags | mgpuregs | m64had | b16flags | regs2 | tune64 | b16split | profile16 | ws4 | nq16 | smema | longnk | persist | outmn | outmn2 | diag | lmhead2 | cachewrite | cachewrite2 | hlodump | rotate | autob1 | mgpum256 | mgpum256e2e | resnorm | mgpuauto | resnorm2 | bigm | bigm8 | bigmauto | defaults256 | cachewrite3 | attnsweep8 | attnsweep24 | defaults70b | coldstart | kernels1b | profile1b | gputests | attnfloor | readfloor | pdl | pdle2e | sweepgrid8bsmall | xlaflags3 | sweepgrid8b | sweepgrid1b | combine | normfold}"

step() {  # step SECONDS LOGNAME COMMAND...: run with a timeout, log to $OUT, never abort the stage
  local t="$1" log="$2"
  shift 2
  echo "== $(date +%T) $* (timeout ${t}s)"
  timeout "$t" "$@" >"$OUT/$log" 2>&1
  echo "== rc=$? ; tail of $log:"
  tail -n 15 "$OUT/$log"
}

flag_ab() {  # flag_ab NAME FLAG SECONDS: 8B w4a16 AR at batch 1 / 16 without, then with FLAG
  local v flag
  for v in off on; do
    flag=""; [ "$v" = on ] && flag="$2"
    step "$3" "$1_$v.log" python3 experiments/sweep.py --models llama3-8b --batches 1,16 \
      --modes w4a16 --new-tokens 64 --repeats 3 $flag --time-budget $(($3 - 10)) \
      --commit "$COMMIT" --out "$OUT/$1_$v.jsonl"
  done
}

e2e_window() {  # e2e_window SECONDS LOGNAME BATCH PROMPT SINK:WINDOW OUTFILE: w4a16 AR vs QSpec gamma 3
  step "$1" "$2" python3 experiments/sweep.py --models llama3-8b --batches "$3" --prompt-len "$4" \
    --new-tokens 128 --modes w4a16,qspec-w4a8 --gammas 3 --max-gamma 4 --cost-gammas 0,3,4 \
    --repeats 1 --decode-timing slope --draft-window "$5" --time-budget $(($1 - 10)) \
    --commit "$COMMIT" --out "$6"
}

xla_flag_runs() {  # xla_flag_runs SECONDS: batch-1 w4a16 AR (8B shapes) under each XLA command-buffer flag set
  local i=0 F
  for F in "" "--xla_gpu_enable_command_buffer=" \
      "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
      "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"; do
    i=$((i + 1))
    XLA_FLAGS="$F" step "$1" xlaflags_$i.log python3 experiments/sweep.py --models llama3-8b \
      --modes w4a16 --batches 1 --new-tokens 64 --repeats 3 --commit "$COMMIT" \
      --out "$OUT/xlaflags_$i.jsonl"
  done
}

case "$stage" in
  kernels)
    # GPU kernel tests (M 2 and 100 are new), the full kernel table with the tuned defaults
    # (all M, README's table), and the fused RMSNorm + quantization kernel against XLA.
    # (Since 1f8d2a6: the fused kernels are off this stage, fused_h200_0413cf4.md; the table gets
    # 400 s: bench_kernels writes its files at the end, the 70B table (168 rows) took 134 s.)
    step 120 gpu_tests.log python3 -m pytest tests/gpu/test_kernels_gpu.py -q -x -p no:cacheprovider
    step 400 kernels_full.log python3 experiments/bench_kernels.py --tag h200_tuned \
      --variants ours_mgpu_w4a16,ours_w4a16,ours_w4a16_asm,ours_mgpu_w4a8,ours_w4a8,ours_w4a8_quant,xla_bf16,xla_s4_dot,xla_w8a8 \
      --commit "$COMMIT" --out "$OUT"
    ;;
  asm)
    # dequant="asm" (nibbles -> bf16 pairs by inline PTX: prmt, lop3, packed fma; untested on a
    # GPU when written): its GPU test cases first (ptxas must accept the PTX), then the timing.
    export QSPEC_GPU_CASES=asm
    step 150 asm_gpu_tests.log python3 -m pytest tests/gpu/test_kernels_gpu.py \
      -q -rA -s -p no:cacheprovider -k matches_reference
    unset QSPEC_GPU_CASES
    step 280 asm_bench.log python3 experiments/bench_kernels.py --ms 1,2,4,8,16,32,64,128 \
      --tag h200_asm --variants ours_w4a16,ours_w4a16_asm,ours_w4a16_cvts,ours_w4a8,xla_s4_dot \
      --commit "$COMMIT" --out "$OUT"
    ;;
  normquant)
    # The fused RMSNorm + per-token quantization kernel against XLA's fusion of the same math,
    # then gamma 3 at batch 4 and 16 with and without it in the model (--norm-quant-kernel sets
    # kernel_dispatch.NORM_QUANT_AUTO; if it wins, make that the default). At 440d085 the kernel
    # walked 128-column pieces and lost (fused_h200.md); since 461c141 it takes the row at once,
    # and row_quant (o_proj / down_proj inputs, SwiGLU fused) rides on the same flag (all kinds;
    # --norm-quant-kernel rmsnorm,swiglu etc. for a subset; fused.log times each kind alone).
    step 70 fused.log python3 experiments/bench_fused.py --commit "$COMMIT" --out "$OUT"
    for v in xla kernel; do
      flag=""
      [ "$v" = kernel ] && flag="--norm-quant-kernel"
      step 200 "normquant_$v.log" python3 experiments/sweep.py --models llama3-8b --batches 4,16 \
        --modes w4a16,qspec-w4a8 --gammas 3 --cost-gammas 0,3 --repeats 2 $flag \
        --commit "$COMMIT" --out "$OUT/normquant_$v.jsonl"
    done
    ;;
  actquant)
    # w4a8_matmul(bits=8): the kernel quantizes the float activations as it loads them (no
    # int8 copy written by XLA). GPU tests, then kernel times against XLA quantization + the
    # kernel, then gamma 3 at batch 4 / 16 with it (compare with normquant_h200_xla.jsonl; if it
    # wins, set kernel_dispatch.ACT_QUANT_IN_GEMM = True; at 22ce2d7 it lost: actquant_h200.md).
    export QSPEC_GPU_CASES=w4a8_q
    step 120 actquant_gpu_tests.log python3 -m pytest tests/gpu/test_kernels_gpu.py \
      -q -rA -p no:cacheprovider -k matches_reference
    unset QSPEC_GPU_CASES
    step 150 actquant_bench.log python3 experiments/bench_kernels.py --ms 1,4,16,64,128 \
      --tag h200_actquant --variants ours_w4a8,ours_w4a8_quant,ours_w4a8_fq,ours_w4a16 \
      --commit "$COMMIT" --out "$OUT"
    step 200 actquant_sweep.log python3 experiments/sweep.py --models llama3-8b --batches 4,16 \
      --modes w4a16,qspec-w4a8 --gammas 3 --cost-gammas 0,3 --repeats 2 --act-quant-in-gemm \
      --commit "$COMMIT" --out "$OUT/actquant_gemm.jsonl"
    ;;
  asmtune)
    # Tiles for the inline-PTX nibbles (asm, the w4a16 default at M <= 16 since 440d085 with the
    # tiles of the "cvt" path it replaced), and asm at the verify sizes (M 32 / 64: "magic" now).
    step 290 asmtune_small.log python3 experiments/bench_kernels.py --sweep --sweep-set asm \
      --ms 1,4,16 --tag h200_asmtune --variants ours_w4a16 --commit "$COMMIT" --out "$OUT"
    step 200 asmtune_verify.log python3 experiments/bench_kernels.py --sweep --sweep-set asm \
      --ms 32,64 --tag h200_asmtune_verify --variants ours_w4a16 --commit "$COMMIT" --out "$OUT"
    ;;
  gemv)
    # Small-M paths side by side (M 1-16, four 8B shapes): today's MMA default, the FMA path with
    # int->float conversions (gemv) and with bit-trick nibbles (gemvm), XLA's own s4 type.
    step 270 gemv_bench.log python3 experiments/bench_kernels.py --ms 1,4,8,16 --tag h200_smallm \
      --variants ours_w4a16,ours_w4a16_gemv,ours_w4a16_gemvm,ours_w4a8,ours_w4a8_gemv,ours_w4a8_gemvm,xla_bf16,xla_s4_dot,xla_s4_w8,xla_w8a8 \
      --commit "$COMMIT" --out "$OUT"
    step 270 gemvm_sweep.log python3 experiments/bench_kernels.py --sweep --ms 1,4 --tag h200_gemvm \
      --variants ours_w4a16_gemvm --commit "$COMMIT" --out "$OUT"
    ;;
  many)
    # Many small programs (split-K 8-64, narrow N tiles) for the FMA path at M 1, 2, 4 and the
    # MMA paths at M 4, 16 (the first gemv_magic sweep got faster with every doubling).
    step 240 many_gemvm.log python3 experiments/bench_kernels.py --sweep --sweep-set many \
      --ms 1,2,4 --tag h200_many_gemvm --variants ours_w4a16_gemvm,ours_w4a8_gemvm \
      --commit "$COMMIT" --out "$OUT"
    step 280 many_mma.log python3 experiments/bench_kernels.py --sweep --sweep-set many \
      --ms 4,16 --tag h200_many_mma --variants ours_w4a16,ours_w4a8 --commit "$COMMIT" --out "$OUT"
    ;;
  verifym)
    # Verify-pass sizes (M 32, 64, 128): split-K 2-8, one M tile of up to 64 rows.
    step 300 verifym.log python3 experiments/bench_kernels.py --sweep --sweep-set many \
      --ms 32,64,128 --tag h200_verifym --variants ours_w4a16,ours_w4a8 --commit "$COMMIT" --out "$OUT"
    ;;
  profile)
    # Device time by kernel and device idle time (host syncs) of a w4a16 step, a fixed gamma-3
    # cycle and an auto cycle drafting 3 (8B shapes, batch 4; profile_h200_8b_b4.md at 1b2edc7:
    # same device time for auto and gamma 3, auto 0.9-1.2 ms slower per cycle unprofiled).
    step 300 profile_b4.log python3 experiments/profile_cycle.py --model llama3-8b --batch 4 \
      --configs w4a16,qspec3,qspec-auto3 --new-tokens 64 --commit "$COMMIT" --out "$OUT/prof"
    ;;
  sweep8b)
    # A new file per commit (sweep_h200_8b.jsonl: commit 36d46a5, before the int8s draft kernel).
    step 540 sweep8b.log python3 experiments/sweep.py --models llama3-8b --batches 1,16,4,64 \
      --modes w4a16,qspec-w4a8 --gammas 3,auto --max-gamma 3 --cost-gammas 0,3 --repeats 2 \
      --time-budget 420 --commit "$COMMIT" --out "$OUT/sweep_h200_8b_$COMMIT.jsonl"
    ;;
  lmhead)
    # int4 lm_head (--quantize-lm-head): the bf16 one is 0.24 ms of every 8B step, draft or
    # AR (profile_h200_8b_b4_440d085.md). AR and gamma 3 at batch 1 / 4 / 16; compare with
    # sweep_h200_8b_440d085.md.
    step 400 lmhead.log python3 experiments/sweep.py --models llama3-8b --batches 1,4,16 \
      --modes w4a16,qspec-w4a8 --gammas 3 --cost-gammas 0,3 --repeats 2 --quantize-lm-head \
      --time-budget 340 --commit "$COMMIT" --out "$OUT/sweep_h200_8b_lmhead_$COMMIT.jsonl"
    ;;
  sweep8b_more)
    step 540 sweep8b_more.log python3 experiments/sweep.py --models llama3-8b --batches 2,8,32,128 \
      --modes w4a16,qspec-w4a8 --gammas 3,auto --max-gamma 3 --cost-gammas 0,3 --repeats 2 \
      --time-budget 480 --commit "$COMMIT" --out "$OUT/sweep_h200_8b_$COMMIT.jsonl"
    ;;
  compile)
    # Where the 20-47 s per 8B program go: XLA's GEMM autotuning (lm_head, attention einsums) is
    # redone in every process. Same two points (w4a16 AR and gamma 3 at batch 4), four runs:
    # default; autotune results cached on disk, twice (the second process reads the first's); no
    # autotuning. Compare compile s and ms/step in the four files.
    for v in default cache1 cache2 noautotune; do
      flags=""
      case "$v" in
        cache*) flags="--xla_gpu_per_fusion_autotune_cache_dir=$OUT/autotune_cache" ;;
        noautotune) flags="--xla_gpu_autotune_level=0" ;;
      esac
      export XLA_FLAGS="$flags"
      step 150 "compile_$v.log" python3 experiments/sweep.py --models llama3-8b \
        --batches 4 --modes w4a16,qspec-w4a8 --gammas 3 --cost-gammas 0,3 --repeats 2 \
        --commit "$COMMIT-$v" --out "$OUT/compile_$v.jsonl"
    done
    unset XLA_FLAGS
    ;;
  tokamax)
    # Needs carry=["wheels"]: bash experiments/fetch_tokamax_wheels.sh first (here, not on the device).
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site wheels/*.whl
    export PYTHONPATH=.:/tmp/site
    step 380 tokamax.log python3 experiments/bench_kernels.py \
      --variants ours_mgpu_w4a16,ours_w4a16,xla_s4_dot,tokamax_w4a16 --ms 1,4,16,64 --tag h200_tokamax \
      --commit "$COMMIT" --out "$OUT"
    ;;
  sweepsmall)
    step 300 sweep_default.log python3 experiments/sweep.py --models default --batches 1,16,64 \
      --modes w4a16,qspec-w4a8 --gammas 3,auto --max-gamma 4 --repeats 2 --time-budget 230 \
      --commit "$COMMIT" --out "$OUT/sweep_h200_default.jsonl"
    ;;
  attention)
    # The issue-7 grid with the model's path (whole cache + layer index) beside the peers, and
    # the read-only verify attention (kernel + new block, log-sum-exp merge) GPU test.
    step 100 attn_gpu_tests.log python3 -m pytest tests/gpu/test_attention_gpu.py -q -rA \
      -p no:cacheprovider -k readonly
    step 420 attention.log python3 experiments/bench_attention.py --ts 1 4 8 --batches 1 8 32 64 \
      --contexts 512 2048 8192 32768 --impls ours ours_layer xla decode_attention \
      --time-budget 380 --reps 3 --commit "$COMMIT" --out "$OUT/attention_h200_full.json"
    ;;
  longe2e4k)
    # The 4 + 4092 window end to end (our trained model keeps 0.77-0.87 of its drafts against
    # 0.72-0.79 for 4 + 1020): w4a16 AR and QSpec gamma 3 at 32 x 8k and 16 x 32k.
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    e2e_window 250 longe2e4k_8k.log 32 8064 4:4092 "$OUT/longe2e4k_h200.jsonl"
    e2e_window 320 longe2e4k_32k.log 16 32512 4:4092 "$OUT/longe2e4k_h200.jsonl"
    ;;
  longe2e2k)
    # The 4 + 2044 window (the best predicted window at 16 x 32k with the 9c85b7a acceptance,
    # longctx_h200_windows.md) end to end: w4a16 AR and QSpec gamma 3.
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    e2e_window 330 longe2e2k_32k.log 16 32512 4:2044 "$OUT/longe2e2k_h200.jsonl"
    ;;
  longmodel)
    # Issue 9's acceptance side: the default model's recipe on 32k-token rows (half of them
    # stdlib source), then QSpec at 2k / 8k / 32k contexts of held-out code: acceptance with the
    # full-cache draft, 1k / 2k / 4k windows, the layer search's subset, and gamma="auto"
    # (full and windowed); outputs checked equal to w4a16. (2de1e46 ran a shorter version:
    # 8k / 32k, 1k and 4k windows, in 5 min.)
    step 330 train_long.log python3 experiments/train.py --seq-len 32768 --batch-size 2 \
      --max-position-embeddings 32768 --rope-theta 500000 --code-fraction 0.5 --minutes 2.5 \
      --eval-per-steps 20 --out /tmp/long --export /tmp/long/hf
    cp /tmp/long/*.json "$OUT/" 2>/dev/null
    step 250 accept_long.log python3 experiments/draft_acceptance.py --model /tmp/long/hf \
      --contexts 32000,8192,2048 --windows 4:1020,4:2044,4:4092 --new-tokens 64 \
      --commit "$COMMIT" --out-prefix "$OUT/draft_acceptance_long_h200"
    ;;
  longctx8b)
    # Issue 9's cost side: where the KV cache dominates a step (batch >= 16 at 8k+), a draft
    # that reads a window of it should cost a fraction of a w4a16 step.
    step 540 longctx8b.log python3 experiments/bench_longctx.py --batches 16,32,64,4,1 \
      --contexts 8192,32768,2048 --repeats 2 --time-budget 450 --commit "$COMMIT" \
      --out "$OUT/longctx_h200.jsonl"
    ;;
  windowfix)
    # Until this stage's commit, time_forward dropped the draft window (timed the whole cache): re-time the
    # windowed drafts, take AR / verify / full-draft timings from the ed34442 run. Then the fused
    # quantization kinds (normquant, shortened to batch 4).
    step 240 longctx8b_window.log python3 experiments/bench_longctx.py --batches 16,32,64,4,1 \
      --contexts 8192,32768,2048 --repeats 2 --reuse experiments/results/longctx_h200_ed34442.jsonl \
      --reuse-drop window,window+layers --commit "$COMMIT" --out "$OUT/longctx_h200.jsonl"
    step 60 fused.log python3 experiments/bench_fused.py --commit "$COMMIT" --out "$OUT"
    for v in xla kernel; do
      flag=""
      [ "$v" = kernel ] && flag="--norm-quant-kernel"
      step 120 "normquant_$v.log" python3 experiments/sweep.py --models llama3-8b --batches 4 \
        --modes w4a16,qspec-w4a8 --gammas 3 --cost-gammas 0,3 --repeats 2 $flag \
        --commit "$COMMIT" --out "$OUT/normquant_$v.jsonl"
    done
    ;;
  smallbatch)
    # Batch < ATTN_MIN_BATCH at long contexts: windowed drafts now take the Pallas kernel (XLA's
    # masked attention read the whole cache); and AR / verify / full drafts with the kernel
    # forced (kernels=pallas) against XLA's attention (the ed34442 run).
    step 130 smallbatch_window.log python3 experiments/bench_longctx.py --batches 4,1 \
      --contexts 32768,8192 --repeats 2 --reuse experiments/results/longctx_h200_ed34442.jsonl \
      --reuse-drop window,window+layers --commit "$COMMIT" --out "$OUT/longctx_h200_small.jsonl"
    step 150 smallbatch_pallas.log python3 experiments/bench_longctx.py --batches 4,1 \
      --contexts 32768,8192 --repeats 2 --drafts full --max-gamma 3 --kernels pallas \
      --commit "$COMMIT" --out "$OUT/longctx_h200_small_pallas.jsonl"
    ;;
  longe2e)
    # The predicted long-context speedups (longctx_h200.md) measured end to end: w4a16 AR and
    # QSpec with the 4 + 1020 window (gamma 3 and auto) at batch 32 x 8k. Random weights:
    # acceptance is whatever the random model gives (compare with the cost model). Prompts
    # prefill in chunks since 2026-11-29 (a whole 16 x 32k prompt ran out of memory at a37c65b).
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    step 290 longe2e_8k.log python3 experiments/sweep.py --models llama3-8b --batches 32 \
      --prompt-len 8064 --new-tokens 128 --modes w4a16,qspec-w4a8 --gammas 3,auto --max-gamma 4 \
      --cost-gammas 0,3,4 --repeats 1 --decode-timing slope --draft-window 4:1020 --time-budget 280 --commit "$COMMIT" \
      --out "$OUT/longe2e_h200_8k.jsonl"
    ;;
  longe2e32)
    # The same at batch 16 x 32k (the 1.58x point of longctx_h200.md).
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    step 540 longe2e_32k.log python3 experiments/sweep.py --models llama3-8b --batches 16 \
      --prompt-len 32512 --new-tokens 128 --modes w4a16,qspec-w4a8 --gammas 3,auto --max-gamma 4 \
      --cost-gammas 0,3,4 --repeats 1 --decode-timing slope --draft-window 4:1020 --time-budget 520 --commit "$COMMIT" \
      --out "$OUT/longe2e_h200_32k.jsonl"
    ;;
  longwin)
    # The window-size trade-off (a larger window costs more bytes per draft step and accepts
    # more): 4 + 2044 and 4 + 4092 beside the 4 + 1020 of longctx_h200.jsonl (its AR, verify
    # and full-draft timings are reused). Pair with the longmodel stage's 4:4092 acceptance.
    step 300 longwin.log python3 experiments/bench_longctx.py --batches 16,32,64 \
      --contexts 32768,8192 --repeats 2 --drafts full,window,window+layers \
      --extra-windows 4:2044,4:4092 --reuse experiments/results/longctx_h200.jsonl \
      --commit "$COMMIT" --out "$OUT/longctx_h200_windows.jsonl"
    ;;
  stream)
    step 200 stream.log python3 experiments/probe_stream.py --commit "$COMMIT" --out "$OUT"
    ;;
  warmcompile)
    # Issue 8: compile time with qj.enable_persistent_cache: the same sweep twice in two processes
    # sharing one cache folder (the second loads the compiled programs and gamma="auto"'s cost
    # tables); compare compile_s of warmcompile_cold.jsonl and warmcompile_warm.jsonl.
    for v in cold warm; do
      step 230 "warmcompile_$v.log" python3 experiments/sweep.py --models llama3-8b --batches 4 \
        --modes w4a16,qspec-w4a8 --gammas 3,auto --max-gamma 4 --cost-gammas 0,3,4 --repeats 2 \
        --cache-dir /tmp/qj_cache --commit "$COMMIT" --out "$OUT/warmcompile_$v.jsonl"
    done
    du -sh /tmp/qj_cache/* | tee "$OUT/warmcompile_cache_size.txt"
    ;;
  kernels70b)
    step 400 kernels70b.log python3 experiments/bench_kernels.py --shapes 70b \
      --ms 1,4,16,64,256,1024 --variants ours_mgpu_w4a16,ours_w4a16,ours_mgpu_w4a8,ours_w4a8,xla_bf16,xla_s4_dot,xla_w8a8 \
      --tag h200_70b --commit "$COMMIT" --out "$OUT"
    ;;
  hadamard)
    # Issue 6's Hadamard + quantization fusion: what the transform costs (the most a fused kernel
    # could save) at the draft's M, width 14336 (Llama-3-8B down_proj input).
    step 150 hadamard.log python3 experiments/bench_fused.py --kinds none,hadamard --ms 1,4,16,64,256 \
      --tag h200_hadamard --commit "$COMMIT" --out "$OUT"
    ;;
  xlaflags3)
    # Issue 8 (batch-1 AR: ~430 small XLA kernels, ~0.65 ms of the 2.34 ms step): XLA flags found
    # in jaxlib 0.10.2's flag table (strings of libjax_common.so) that may cut launch gaps or
    # kernels: programmatic dependent launch (xla_gpu_enable_pdl: both values, the default
    # unknown) and the block-level fusion rewriter (normalization "diamonds" such as RMSNorm as one
    # Triton kernel). Each flag set is tried in a child process first (XLA aborts on an unknown
    # flag); the device's own flag names are saved for later stages.
    for so in $(python3 -c "import jaxlib, os; print(os.path.dirname(jaxlib.__file__))")/*.so \
        $(python3 -c "import jax_plugins, os; print(os.path.dirname(jax_plugins.__path__[0]))" 2>/dev/null)/jax_plugins/*/*.so; do
      [ -f "$so" ] && grep -a -o "xla_gpu_[a-z0-9_]*" "$so"
    done | sort -u > "$OUT/xla_gpu_flag_names.txt" || true
    i=0
    for F in "" "--xla_gpu_enable_pdl=true" "--xla_gpu_enable_pdl=false" \
        "--xla_gpu_experimental_enable_fusion_block_level_rewriter=true"; do
      i=$((i + 1))
      if ! XLA_FLAGS="$F" timeout 60 python3 -c "import jax.numpy as jnp; (jnp.zeros(2) + 1).block_until_ready()" \
          >/dev/null 2>&1; then
        echo "== XLA refuses '$F': skipped"; continue
      fi
      XLA_FLAGS="$F" step 85 xlaflags3_$i.log python3 experiments/sweep.py --models llama3-8b \
        --modes w4a16 --batches 1,16 --new-tokens 64 --repeats 3 --time-budget 75 \
        --commit "$COMMIT" --out "$OUT/xlaflags3_$i.jsonl"
      echo "== set $i: XLA_FLAGS='$F'"
    done
    ;;
  coldstart)
    # The API default question (QSpec gamma 3 vs gamma="auto"): a user's first and second
    # generate call in a fresh process, 8B shapes, batch 1 and 16, w4a16 / qspec3 / auto (auto's
    # calibration stops early where no gamma can pay: cost_model.no_gamma_can_pay), ~9 min.
    for b in 1 16; do
      for c in w4a16 qspec3 auto; do
        t=75; [ $c = auto ] && t=130  # auto: two timed-forward programs + the one it runs
        step $t coldstart_b${b}_$c.log python3 experiments/coldstart.py --model llama3-8b \
          --batch $b --config $c --commit "$COMMIT" --out "$OUT/coldstart_h200.jsonl"
      done
    done
    python3 experiments/coldstart.py --report "$OUT/coldstart_h200.jsonl"
    ;;
  readfloor)
    # Issues 6 / 8, "show why not": the read floor by size. XLA's row reduction over int8 buffers
    # of each 1B / 8B / 70B int4 GEMM's weight bytes (2-117 MB; copies > L2): what one streaming read
    # of that many bytes reaches, whatever the kernel (~2 min).
    step 150 readfloor.log python3 experiments/probe_stream.py --xla-only \
      --shapes 8b,70b,2048x3072,2048x2048,2048x16384,8192x2048 \
      --commit "$COMMIT" --out "$OUT/readfloor"
    ;;
  attnfloor)
    # Issue 7's "show why not" at batch 1: the batch 1 / 2 / 4 / 8 points at T 1 with the read-only
    # floor beside our kernel and decode_attention (XLA's reduction over the same K / V bytes in
    # the same loop: what one streaming read of 8-134 MB reaches), the device time per kernel of
    # each (our attention kernel vs its split combine; decode_attention's), and the 74ec0d1
    # few-program split rule (batch 2 / 4) as defaults (~5 min).
    step 300 attnfloor.log python3 experiments/bench_attention.py --batches 1 2 4 8 \
      --contexts 2048 8192 32768 --ts 1 --impls ours decode_attention --reps 3 --time-budget 280 \
      --kernel-times \
      --commit "$COMMIT" --out "$OUT/attention_floor_h200.json"
    ;;
  gputests)
    # GPU tests that ran out of their step's time at 74ec0d1 (attention: 58 cases in 150 s; the
    # kernels stage's Triton kernel tests: nothing printed in 120 s) and the Mosaic tests the
    # 74ec0d1 review refactor touched (smem_a, the model-level switch tests: 19 cases), ~9 min.
    # Unbuffered (-u): a step cut by its timeout still shows the cases that passed (249 Triton
    # kernel cases may not all fit).
    step 120 gputests_mgpu.log python3 -u -m pytest -q -x -p no:warnings tests/gpu/test_w4_mgpu_gpu.py \
      -k "smem_a or in_the_model"
    step 190 gputests_attention.log python3 -u -m pytest -q -x -p no:cacheprovider tests/gpu/test_attention_gpu.py
    step 230 gputests_kernels.log python3 -u -m pytest -q -x -p no:cacheprovider tests/gpu/test_kernels_gpu.py
    ;;
  kernels1b)
    # Issue 8 at 1B shapes: the GEMMs of a Llama-3.2-1B layer alone (Mosaic w4a16 / w4a8, XLA
    # bf16), M 1-256, next to profile1b's step breakdown: is the int8 kernel itself slower on
    # 2048-wide layers, or the draft's activation quantization (~3 min)?
    step 200 kernels1b.log python3 experiments/bench_kernels.py --tag h200_1b --shapes 1b \
      --ms 1,4,16,64,128,256 --variants ours_mgpu_w4a16,ours_mgpu_w4a8,ours_w4a8_quant,xla_bf16 \
      --commit "$COMMIT" --out "$OUT"
    ;;
  profile1b)
    # Issue 8 at Llama-3.2-1B shapes: w4a8 AR was 0.93x / 0.91x w4a16 AR at batch 1 / 16
    # (sweepgrid_h200_llama3.2-1b.md, 74ec0d1), so no draft can pay there. Device time by kernel of
    # a w4a16 step, a w4a8 step and a gamma-3 cycle at batch 1 and 16: where the draft's time goes.
    for b in 1 16; do
      step 200 profile1b_b$b.log python3 experiments/profile_cycle.py --model llama3.2-1b \
        --batch $b --configs w4a16,w4a8,qspec3 --new-tokens 64 --commit "$COMMIT" --out "$OUT/prof1b"
    done
    ;;
  sweepgrid8bsmall)
    # Issue 8: the 8B grid's batch 1-8 rows again with --min-time 1.0 (they came from e42adce /
    # 255f41e with 3 repeats, and the batch-1 / 4 AR rows carry a slow first repeat that makes
    # gamma auto look 1.04-1.10x AR): every mode but w16, gamma 3 and auto, resumable.
    f="sweepgrid_h200_llama3-8b_b1-8_mintime.jsonl"
    [ -f "experiments/results/$f" ] && cp "experiments/results/$f" "$OUT/$f"
    step 560 "${stage}.log" python3 experiments/sweep.py --models llama3-8b --batches 1,4,2,8 \
      --modes w4a16,qspec-w4a8,w4a8,qspec-w4a4 --gammas 3,auto --max-gamma 7 \
      --cost-gammas 0,1,3,5,7 --repeats 3 --new-tokens 64 --min-time 1.0 --time-budget 500 \
      --commit "$COMMIT" --out "$OUT/$f"
    ;;
  pdl)
    # Issues 6 / 8: programmatic dependent launch for the Mosaic GEMMs of <= 16 padded rows
    # (w4_mgpu.MgpuConfig.pdl: "wait" = the plain kernel after a griddepcontrol wait, so its
    # launch and set-up overlap the previous kernel's tail; "prefetch" = its first weight loads
    # issued before the wait, x TMA'd whole after it). Does this jax launch them with PDL; GPU
    # tests; per-GEMM times of the default config and both variants at M 1 / 16 (R distinct
    # weights per timed call, back to back). End to end: stage pdle2e.
    step 30 pdl_support.log python3 -c "import jax; from pallas_kernels import w4_mgpu; print('jax', jax.__version__, 'pdl launch:', w4_mgpu.pdl_launch_supported())"
    step 200 pdl_gpu_tests.log python3 -m pytest -q -x -p no:warnings tests/gpu/test_w4_mgpu_gpu.py -k "pdl"
    step 230 pdl_probe.log python3 experiments/probe_mgpu.py --sweep pdl --ms 1,16 --shapes 8b \
      --modes w4a16,w4a8 --no-baselines --iters 20 --time-budget 210 --commit "$COMMIT" \
      --out "$OUT/pdl_probe"
    ;;
  pdle2e)
    # The pdl stage's end-to-end half: 8B w4a16 AR at batch 1 / 16 with w4_mgpu.PDL off / wait /
    # prefetch (fresh processes, at least 1 s of timed runs per point).
    for v in off wait prefetch; do
      step 85 pdl_e2e_$v.log python3 experiments/sweep.py --models llama3-8b --batches 1,16 \
        --modes w4a16 --new-tokens 64 --repeats 3 --min-time 1.0 --mgpu-pdl $v --time-budget 75 \
        --commit "$COMMIT" --out "$OUT/pdl_e2e_$v.jsonl"
    done
    ;;
  defaults70b)
    # Issue 6: the model's GEMM dispatch at Llama-70B shapes. kernel_dispatch sends w4a16 GEMMs
    # wider than 8192 columns above 64 rows to XLA's GEMM over int4 [N, K] (measured faster for
    # the 8B gate/up); kernels_h200_70b_1f8d2a6.md timed the Mosaic kernel against XLA's s4 dot
    # over [K, N], not that path. GPU tests of the 70B default configs first (M 1-256).
    step 200 defaults70b_gpu_tests.log python3 -m pytest -q -x -p no:warnings tests/gpu/test_w4_mgpu_gpu.py \
      -k "70b_default"
    step 300 defaults70b.log python3 experiments/probe_mgpu.py --sweep default --ms 64,128,256 \
      --shapes 70b --modes w4a16,w4a8 --baseline-variants xlank_w4a16,xlank_w4a8 --iters 20 \
      --time-budget 280 --commit "$COMMIT" --out "$OUT/defaults70b"
    ;;
  splits248)
    # Issue 7 after 5a59859 (batch 1: a full wave of splits, attention_sweep_b1_h200_c64168d.md):
    # batch 2-8 keep at most FEW_PROGRAMS_SPLITS = 4 splits, chosen while the split combine cost
    # 4-11 us (attention_sweep_b248_h200_74ec0d1.md); with the 2 us combine more splits may pay.
    # The sweep varies the splits x0.25-4 around the default at each point, and times batch 1 at
    # the short-context decode's 256-position cache (T 1 / 4: the model's attention at 8B batch
    # 1 takes 4.8 us x 32 layers per step there, hlo_summary_b1_xpad_7e1796b.md); then the batch 1
    # / 8 grid at T 1 / 4 against both peers with the current defaults.
    step 370 splits248.log python3 experiments/bench_attention.py --sweep \
      --sweep-points 2:2048:1,4:2048:1,8:2048:1,2:8192:1,4:8192:1,8:8192:1,1:256:1,1:256:4 \
      --reps 3 --time-budget 350 --commit "$COMMIT" --out "$OUT/attention_sweep_b248_h200.json"
    step 180 attnpeers18.log python3 experiments/bench_attention.py --batches 1 8 \
      --contexts 2048 8192 32768 --ts 1 4 --reps 3 --time-budget 160 --commit "$COMMIT" \
      --out "$OUT/attention_b18_h200.json"
    ;;
  hadamardk)
    # Issue 8 / 6 (rotated models): the online Hadamard in one Pallas kernel (rotation impl
    # "pallas", pallas_kernels/hadamard.py) vs the GEMM form (2 XLA GEMMs: 4.4 / 7.2 us at M 1 /
    # 16 for 14336, hadamard_h200.md). GPU tests, the transform alone, then 8B rotated w4a16 AR.
    step 150 hadamardk_gpu_tests.log python3 -m pytest tests/gpu/test_hadamard_gpu.py -q -x -p no:cacheprovider
    step 100 hadamardk_bench.log python3 experiments/bench_hadamard.py --widths 14336,8192,4096 \
      --ms 1,4,16,64,256,1024 --impls dense,pallas --commit "$COMMIT" --tag h200_kernel --out "$OUT"
    step 60 hadamardk_swiglu.log python3 experiments/bench_hadamard.py --widths 14336,8192 \
      --ms 1,4,16,64 --impls dense,pallas --swiglu --commit "$COMMIT" --tag h200_kernel_swiglu --out "$OUT"
    for v in dense pallas; do
      step 105 "hadamardk_8b_$v.log" python3 experiments/sweep.py --models llama3-8b --batches 1,16 \
        --modes w4a16 --new-tokens 64 --repeats 3 --rotate --hadamard-impl $v --time-budget 95 \
        --commit "$COMMIT" --out "$OUT/hadamardk_8b_$v.jsonl"
    done
    ;;
  prof16rot)
    # Issue 8: a rotated 8B step at batch 16 cost 3.053 ms vs 2.472 unrotated (vheads_h200_69501a6.md,
    # normscale_h200_fffd870.md): ~18 us per layer, more than hadamard_h200.md's 7.2 us for the
    # 14336-wide transform at M = 16 plus the head mixing. Device time by kernel, rotated vs not.
    for v in rot plain; do
      flag=""; [ "$v" = rot ] && flag="--rotate"
      step 150 "profile_b16_$v.log" python3 experiments/profile_cycle.py --model llama3-8b \
        --batch 16 --configs w4a16 --new-tokens 64 $flag --commit "$COMMIT" --out "$OUT/prof_b16_$v"
      rm -rf "$OUT/prof_b16_$v"/trace_*
    done
    ;;
  vheads)
    # Rotated models: the per-head part of o_proj's online Hadamard folded into v_proj
    # (QuantConfig.rotate_v_heads), so only a [heads x heads] mixing runs online, vs the full
    # 4096-wide transform (--full-o-rotation: conversions before it). 8B w4a16 AR, batch 1 / 16.
    for v in heads full; do
      flag=""; [ "$v" = full ] && flag="--full-o-rotation"
      step 105 "vheads_$v.log" python3 experiments/sweep.py --models llama3-8b --batches 1,16 \
        --modes w4a16 --new-tokens 64 --repeats 3 --rotate $flag --time-budget 95 \
        --commit "$COMMIT" --out "$OUT/vheads_$v.jsonl"
    done
    ;;
  retime25)
    # After the fffd870 runs: batch 1 splits short caches down to one key block per split, batch 2
    # takes 8 splits (attention_sweep_b248_h200_fffd870.md), and verify mode folds the RMSNorm
    # into the GEMMs at one row (quant.NORM_SCALE_FOLD = "auto", normscale_h200_fffd870.md).
    # GPU attention tests; the new defaults at the changed points (sweep: default vs x0.25-4);
    # 8B w4a16 AR b1 with the defaults, and QSpec gamma 3 at b1 with the fold at every width
    # ("on": the 4-row verify pass folded too) vs "auto" (the verify pass unfolded).
    step 240 retime25_gpu_tests.log python3 -u -m pytest tests/gpu/test_attention_gpu.py -q -x -p no:cacheprovider
    step 100 retime25_attn.log python3 experiments/bench_attention.py --sweep \
      --sweep-points 2:2048:1,2:8192:4,1:512:1,1:1024:1,1:256:4 \
      --reps 3 --time-budget 90 --commit "$COMMIT" --out "$OUT/attention_sweep_new_h200.json"
    for v in auto on; do
      step 95 "retime25_qspec_$v.log" python3 experiments/sweep.py --models llama3-8b --batches 1 \
        --modes w4a16,qspec-w4a8 --gammas 3 --max-gamma 3 --cost-gammas 0,3 --repeats 3 \
        --new-tokens 64 --norm-scale-fold $v --time-budget 85 --commit "$COMMIT" \
        --out "$OUT/retime25_qspec_$v.jsonl"
    done
    ;;
  retime24)
    # The GPU attention tests with room for all 67 cases (the combine stage's 200 s cut the 63rd),
    # then 8B decoding end to end with the new attention defaults: w4a16 AR and gamma 3 at
    # batch 1 and 16 (compare sweepgrid_h200_llama3-8b.md, normfold_h200_c64168d.md; resumable).
    step 280 retime_gpu_tests.log python3 -u -m pytest tests/gpu/test_attention_gpu.py -q -x -p no:cacheprovider
    # The stacked KV cache (b7c2c73) on the GPU backend: the compiled decode / QSpec loops hold no
    # copy of the cache and no whole-K/V slice with the Pallas attention reading it twice.
    step 90 retime_nocopy.log python3 -m pytest tests/test_speculative.py -q -k no_cache_copies \
      -p no:cacheprovider
    step 210 retime_llama3-8b.log python3 experiments/sweep.py --models llama3-8b --batches 1,16 \
      --modes w4a16,qspec-w4a8 --gammas 3 --max-gamma 3 --cost-gammas 0,3 --repeats 3 \
      --new-tokens 64 --min-time 1.0 --time-budget 180 --commit "$COMMIT" \
      --out "$OUT/retime_h200_llama3-8b.jsonl"
    ;;
  normscale)
    # Issue 8 (batch-1 AR roofline): quant.NORM_SCALE_FOLD, the verify GEMMs after each RMSNorm
    # reading the residual stream and scaling their output rows by the norm's factor, so the
    # normalize kernel (2 per layer, ~1.3-1.8 us each: hlo_summary_b1_xpad_7e1796b.md) goes.
    # Random-weight models are not rotated (their gains multiply the residual first); --rotate
    # times the folded-gains path a converted model runs.
    flag_ab normscale8b --norm-scale-fold 120
    for v in off on; do
      flag=""; [ "$v" = on ] && flag="--norm-scale-fold"
      step 80 "normscale8b_rot_$v.log" python3 experiments/sweep.py --models llama3-8b \
        --batches 1 --modes w4a16 --new-tokens 64 --repeats 3 --rotate $flag --time-budget 70 \
        --commit "$COMMIT" --out "$OUT/normscale8b_rot_$v.jsonl"
      step 65 "normscale1b_$v.log" python3 experiments/sweep.py --models llama3.2-1b \
        --batches 1,16 --modes w4a16 --new-tokens 64 --repeats 3 --min-time 1.0 $flag \
        --time-budget 55 --commit "$COMMIT" --out "$OUT/normscale1b_$v.jsonl"
    done
    ;;
  normfold)
    # Issues 8 / 6: the draft's RMSNorm + quantization with the norm folded into the scale
    # (quant.NORM_QUANT_FOLD, sweep --norm-quant-fold: two sibling row reductions + one pass
    # instead of norm, max-reduction, quantize) against the default, w4a8 AR and w4a16 AR at batch
    # 1 / 16 on the 1B and 8B shapes (a w4a8 step ran ~100 more kernels than a w4a16 one at 1B:
    # profile_h200_1b_b1_a7717e1.md), alternating runs, --min-time 1.0 (~8 min).
    # (w4a16 does not read the flag: timed once, beside the default w4a8.)
    for model in llama3.2-1b llama3-8b; do
      t=100; [ $model = llama3-8b ] && t=170
      step $t "normfold_${model}_base.log" python3 experiments/sweep.py --models "$model" \
        --batches 1,16 --modes w4a8,w4a16 --repeats 3 --new-tokens 64 --min-time 1.0 \
        --time-budget $((t - 15)) --commit "$COMMIT" --out "$OUT/normfold_h200_${model}_base.jsonl"
      step $((t / 2 + 20)) "normfold_${model}_fold.log" python3 experiments/sweep.py --models "$model" \
        --batches 1,16 --modes w4a8 --repeats 3 --new-tokens 64 --min-time 1.0 --norm-quant-fold \
        --time-budget $((t / 2)) --commit "$COMMIT" --out "$OUT/normfold_h200_${model}_fold.jsonl"
    done
    ;;
  combine)
    # Issue 7 after 6c256a0: the split combine loads all splits at once and spreads the head dim
    # over programs (was 3.9-11.3 us of a 13-50 us batch-1 call, attention_floor_h200_a7717e1.md).
    # GPU attention tests first (62 cases, ~170 s), then batch 1-8 at T 1 with kernel times, then
    # a split sweep at batch 1 (a cheaper combine may favour more splits), ~9.5 min.
    step 260 combine_gpu_tests.log python3 -u -m pytest tests/gpu/test_attention_gpu.py -q -x -p no:cacheprovider
    step 150 combine_b1248.log python3 experiments/bench_attention.py --batches 1 2 4 8 \
      --contexts 2048 8192 32768 --ts 1 --impls ours decode_attention --reps 3 --time-budget 130 \
      --kernel-times --commit "$COMMIT" --out "$OUT/attention_combine_h200.json"
    step 200 combine_sweep1.log python3 experiments/bench_attention.py --sweep \
      --sweep-points 1:2048:1,1:8192:1,1:32768:1 --reps 3 --time-budget 180 \
      --commit "$COMMIT" --out "$OUT/attention_sweep_b1_combine_h200.json"
    ;;
  attnsweep24)
    # Issue 7: the few-program defaults after 1f8d2a6 (64-key blocks x 3 stages up to 8k at batch
    # 2-8, 3 stages at batch 1 x 32k, ~sqrt(blocks) splits at batch 1;
    # attention_sweep_b{1,8}_h200_1f8d2a6.md) where they were not
    # swept: batch 2 / 4 at 2k / 8k, and batch 8 x 32k (kept at 128-key blocks) for the boundary;
    # then the full grid's batch 1 / 8 points with the new defaults against both peers. GPU
    # tests of the kernel (its default configs on ragged batches) first.
    step 150 attn_gpu_tests.log python3 -m pytest tests/gpu/test_attention_gpu.py -q -x -p no:cacheprovider
    step 330 attnsweep24.log python3 experiments/bench_attention.py --sweep \
      --sweep-points 2:2048:1,4:2048:1,4:8192:1,8:32768:1 --reps 3 --time-budget 300 \
      --commit "$COMMIT" --out "$OUT/attention_sweep_b248_h200.json"
    step 200 attnpeers18.log python3 experiments/bench_attention.py --batches 1 8 \
      --contexts 2048 8192 32768 --ts 1 4 8 --reps 3 --time-budget 180 --commit "$COMMIT" \
      --out "$OUT/attention_b18_h200.json"
    ;;
  attnst3)
    # Issue 7 after 3 stages for one-program-per-SM configs (128-key bf16 blocks: batch 8 x 32k,
    # batch 32 / 64, windowed batch 16): GPU attention tests, then the batch 8 / 32 / 64 grid
    # points at 2k-32k, T 1 / 4 / 8 (ours only: the peers ran at f7709b4, attention_h200_full_f7709b4.md).
    step 200 attnst3_gpu_tests.log python3 -m pytest tests/gpu/test_attention_gpu.py -q -x \
      -p no:cacheprovider -k "not chunked"
    step 300 attnst3.log python3 experiments/bench_attention.py --ts 1 4 8 --batches 8 32 64 \
      --contexts 2048 8192 32768 --impls ours --time-budget 270 --reps 3 --commit "$COMMIT" \
      --out "$OUT/attention_st3_h200.json"
    ;;
  attnsweep64)
    # Issue 7: batch 64 reads its KV at 79-80% of 4.8 TB/s at 8k / 32k where batch 32 reaches
    # 87-91% and the read floor 90% (attention_h200_full_f7709b4.md): the config sweep there, and
    # batch 1 x 32k (67%, floor 72%, target 70%).
    step 400 attnsweep64.log python3 experiments/bench_attention.py --sweep \
      --sweep-points 64:8192:1,64:32768:1,1:32768:1 --reps 3 --time-budget 370 \
      --commit "$COMMIT" --out "$OUT/attention_sweep_b64_h200.json"
    ;;
  attnsweep8)
    # Issue 7: batch 8 x 2k misses the 70% target (41-47% of 4.8 TB/s, attention_h200_full.md;
    # ~4 blocks of 128 keys per split at the default ~2 programs per SM): our kernel's configs
    # there at T = 1 / 4 / 8, and 8 x 8k T = 1 for reference (64-70%).
    step 330 attnsweep8.log python3 experiments/bench_attention.py --sweep \
      --sweep-points 8:2048:1,8:2048:4,8:2048:8,8:8192:1 --reps 3 --time-budget 300 \
      --commit "$COMMIT" --out "$OUT/attention_sweep_b8_h200.json"
    ;;
  attnsweep1)
    # Batch 1 misses issue 7's target (7-36% of 4.8 TB/s, attention_h200_full.md) where JAX's
    # decode_attention (256-key blocks, 16 splits) is 1.3-1.6x faster: our kernel's configs there.
    step 330 attnsweep1.log python3 experiments/bench_attention.py --sweep \
      --sweep-points 1:8192:1,1:32768:1,1:32768:4,1:2048:1 --reps 3 --time-budget 300 \
      --commit "$COMMIT" --out "$OUT/attention_sweep_b1_h200.json"
    ;;
  mgpu)
    # Issue 6: the Mosaic GPU kernel's GPU tests (kernel cases + the default model in the int4
    # [N, K] layout: QSpec = w4a16 tokens), then the tile sweep on the two large 8B shapes and the
    # kernel at M = 32 / 64 against Triton (verify passes at batch 8-16; kernel_dispatch.MGPU_MAX_M).
    step 280 mgpu_gpu_tests.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA -p no:cacheprovider
    step 290 probe_mgpu.log python3 experiments/probe_mgpu.py --out "$OUT" --shapes 4096x28672,14336x4096 \
      --ms 1,4,16,32,64 --sweep tune --sweep-modes w4a16 --time-budget 270 --commit "$COMMIT"
    ;;
  mgpuws)
    # Issue 6: the warp-specialized Mosaic kernel (TMA warpgroup + two compute warpgroups sharing
    # the x tile; lowered on CPU only so far): correctness and time at the four 8B shapes.
    step 320 probe_mgpu_ws.log python3 experiments/probe_mgpu.py --out "$OUT/ws" --shapes 8b \
      --ms 1,4,16 --sweep ws --sweep-modes w4a16 --no-baselines --time-budget 300 --commit "$COMMIT"
    ;;
  mgpucompile)
    # Issues 6/8: where the int4 [N, K] layout's compile time goes (its 8B batch-1 program did not
    # finish in 95 s at 456852e; the stored layout's: 22.8 s): lower vs compile, with and without
    # XLA's autotuning (wider GEMMs run XLA's int4 dot in that layout).
    step 100 compile_probe_half_split.log python3 experiments/compile_probe.py --weight-layout half_split \
      --out "$OUT/compile_probe_half_split.json"
    XLA_FLAGS=--xla_gpu_autotune_level=0 step 190 compile_probe_nk_noautotune.log \
      python3 experiments/compile_probe.py --weight-layout nk --out "$OUT/compile_probe_nk_noautotune.json"
    step 200 compile_probe_nk.log python3 experiments/compile_probe.py --weight-layout nk \
      --out "$OUT/compile_probe_nk.json"
    ;;
  mgpue2e)
    # Issues 6/8: w4a16 AR and QSpec gamma 3 in both layouts, 8B shapes, batch 1 / 4 / 16
    # (a persistent cache so the second process reuses what the first compiled).
    for L in nk half_split; do
      step 280 mgpue2e_$L.log python3 experiments/sweep.py --models llama3-8b --modes w4a16,qspec-w4a8 \
        --gammas 3 --max-gamma 3 --cost-gammas 0,3 --batches 1,4,16 --new-tokens 64 --repeats 2 \
        --weight-layout $L --cache-dir /tmp/qj_cache --time-budget 260 --commit "$COMMIT" \
        --out "$OUT/mgpue2e_$L.jsonl"
    done
    ;;
  mgpue2e1)
    # Issues 6/8, batch 1 only (the int4 [N, K] program compiles in ~90 s at f8f83b3: lowering
    # 35 s for its Mosaic calls, XLA compile 50-56 s with or without autotuning).
    for L in half_split nk; do
      T=$([ $L = nk ] && echo 420 || echo 140)
      step $T mgpue2e1_$L.log python3 experiments/sweep.py --models llama3-8b --modes w4a16,qspec-w4a8 \
        --gammas 3 --max-gamma 3 --cost-gammas 0,3 --batches 1 --new-tokens 64 --repeats 3 \
        --weight-layout $L --time-budget $((T - 20)) --commit "$COMMIT" --out "$OUT/mgpue2e1_$L.jsonl"
    done
    ;;
  mgpue2e2)
    # Issues 6/8 after the one-function-per-shape Mosaic kernels: the model-level GPU test, the
    # nk compile probe, then AR + gamma 3 at batch 1 in the nk layout (mgpue2e1 has the stored one).
    step 100 mgpu_model_gpu_test.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k model
    step 110 compile_probe_nk_dedup.log python3 experiments/compile_probe.py --weight-layout nk \
      --out "$OUT/compile_probe_nk_dedup.json"
    step 320 mgpue2e2_nk.log python3 experiments/sweep.py --models llama3-8b --modes w4a16,qspec-w4a8 \
      --gammas 3 --max-gamma 3 --cost-gammas 0,3 --batches 1 --new-tokens 64 --repeats 3 \
      --weight-layout nk --time-budget 300 --commit "$COMMIT" --out "$OUT/mgpue2e2_nk.jsonl"
    ;;
  mgpue2e3)
    # The same pair at batch 4 and 16 (verify M = 16 / 64: the nk layout runs M > 16 on XLA).
    for L in nk half_split; do
      step 250 mgpue2e3_$L.log python3 experiments/sweep.py --models llama3-8b --modes w4a16,qspec-w4a8 \
        --gammas 3 --max-gamma 3 --cost-gammas 0,3 --batches 16,4 --new-tokens 64 --repeats 3 \
        --weight-layout $L --time-budget 225 --commit "$COMMIT" --out "$OUT/mgpue2e3_$L.jsonl"
    done
    ;;
  mgpum64)
    # Issue 6 / kernel_dispatch.MGPU_MAX_M: the Mosaic kernel (default configs) at M 16-64 against
    # what the model runs there in the nk layout (XLA's GEMM over int4 [N, K]) and our Triton
    # kernels, 8B shapes; then the tune sweep at M = 64.
    step 260 probe_mgpu_m64.log python3 experiments/probe_mgpu.py --out "$OUT/m64" --sweep default \
      --ms 16,24,32,48,64 --commit "$COMMIT" --time-budget 240
    step 280 probe_mgpu_m64_tune.log python3 experiments/probe_mgpu.py --out "$OUT/m64tune" --sweep tune \
      --sweep-m 64 --ms 32,64 --baseline-variants xlank_w4a16,xlank_w4a8 --commit "$COMMIT" --time-budget 260
    ;;
  m64had)
    # mgpum64's first half and hadamard2 (the two widths of the 8B shapes) in one device call.
    step 250 probe_mgpu_m64.log python3 experiments/probe_mgpu.py --out "$OUT/m64" --sweep default \
      --ms 16,24,32,48,64 --commit "$COMMIT" --time-budget 230
    step 230 hadamard2.log python3 experiments/bench_hadamard.py --commit "$COMMIT" --out "$OUT" \
      --widths 14336,4096
    ;;
  mgpuregs)
    # Issue 6: the Mosaic kernel with 64/128-wide K steps and 3-8 stage rings (fewer registers per
    # thread, more bytes in flight; never timed: all earlier sweeps used block_k >= 256), 8B
    # shapes, swept at M = 16, the best config then at M 1/4/16; GPU tests of those configs first.
    step 100 mgpuregs_gpu_tests.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k other_configs
    step 420 probe_mgpu_regs.log python3 experiments/probe_mgpu.py --out "$OUT/regs" --sweep regs \
      --sweep-modes w4a16 --ms 1,4,16 --commit "$COMMIT" --time-budget 400
    ;;
  hadamard2)
    # Issue 6: the online Hadamard of rotated models, butterfly vs GEMM form (rotation.HADAMARD_IMPL),
    # widths 14336 / 4096 / 8192, M 1-4096.
    step 280 hadamard2.log python3 experiments/bench_hadamard.py --commit "$COMMIT" --out "$OUT"
    ;;
  xlaflags)
    # Issue 8 (batch-1 AR at 43.5% of roofline, ~0.7 ms of each 2.69 ms step outside the GEMMs and
    # the lm_head): does CUDA-graph capture of more of the step (XLA command buffers) cut the
    # launch gaps? w4a16 AR, 8B shapes, batch 1, the default (nk) layout, one run per flag set.
    xla_flag_runs 110
    ;;
  b16flags)
    # After MGPU_MAX_M 16 -> 64: batch 16 AR + gamma 3 in the nk layout (its verify pass, M = 64,
    # now runs the Mosaic kernel; mgpue2e3 has it on XLA), then the xlaflags sets.
    step 200 b16_nk.log python3 experiments/sweep.py --models llama3-8b --modes w4a16,qspec-w4a8 \
      --gammas 3 --max-gamma 3 --cost-gammas 0,3 --batches 16 --new-tokens 64 --repeats 3 \
      --weight-layout nk --time-budget 180 --commit "$COMMIT" --out "$OUT/b16_nk.jsonl"
    xla_flag_runs 90
    ;;
  regs2)
    # GPU tests after MGPU_MAX_M 16 -> 64 (model-level: verify passes of 48 rows on the Mosaic
    # kernel) and of the narrow-K configs, then the mgpuregs sweep.
    step 130 mgpu_gpu_tests_regs2.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k "model or auto or other_configs or rejects"
    step 380 probe_mgpu_regs.log python3 experiments/probe_mgpu.py --out "$OUT/regs" --sweep regs \
      --sweep-modes w4a16 --ms 1,4,16 --commit "$COMMIT" --time-budget 360
    ;;
  tune64)
    # The Mosaic GPU tests at model level (12 sequences: verify passes of 48 rows), then the tune
    # sweep at M = 64 (the gamma-3 verify pass of batch 16: only 24% of the roofline with the
    # M <= 16 configs, mgpu_h200_m64.md).
    step 150 mgpu_gpu_tests_model.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k "model or auto"
    step 300 probe_mgpu_m64_tune.log python3 experiments/probe_mgpu.py --out "$OUT/m64tune" --sweep tune \
      --sweep-m 64 --ms 48,64 --baseline-variants xlank_w4a16,xlank_w4a8 --commit "$COMMIT" --time-budget 280
    ;;
  b16split)
    # After the M > 32 split-K rule: the kernel GPU tests at M 40 / 64 (and 24), then batch 16 AR +
    # gamma 3 in the nk layout (compare b16flags' b16_nk).
    step 150 mgpu_gpu_tests_m64.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k "matches_reference and (64 or 40 or 24)"
    step 200 b16_nk_split.log python3 experiments/sweep.py --models llama3-8b --modes w4a16,qspec-w4a8 \
      --gammas 3 --max-gamma 3 --cost-gammas 0,3 --batches 16 --new-tokens 64 --repeats 3 \
      --weight-layout nk --time-budget 180 --commit "$COMMIT" --out "$OUT/b16_nk_split.jsonl"
    ;;
  profile16)
    # Why a batch-16 draft step (~3.0 ms) costs more than a w4a16 AR step (2.69 ms) though its
    # GEMMs are faster (b16_nk_split): device time by kernel, nk layout.
    step 280 profile_b16.log python3 experiments/profile_cycle.py --model llama3-8b --batch 16 \
      --configs w4a16,qspec3 --new-tokens 32 --commit "$COMMIT" --out "$OUT/prof16"
    ;;
  ws4)
    # mgpuws cut to the device time left in a session (~5 min): the warp-specialized kernel.
    step 250 probe_mgpu_ws.log python3 experiments/probe_mgpu.py --out "$OUT/ws" --shapes 8b \
      --ms 1,16 --sweep ws --sweep-modes w4a16 --no-baselines --time-budget 230 --commit "$COMMIT"
    ;;
  nq16)
    # The fused RMSNorm / o_proj-input quantization kernels ("rmsnorm", "none"; not SwiGLU) in the
    # draft, batch-16 gamma 3, nk layout (compare b16split's 12.10 ms cycle: ~6 small XLA
    # quantization kernels per layer per draft step, profile_h200_8b_b16_nk_b7044e9.md).
    step 170 b16_nq.log python3 experiments/sweep.py --models llama3-8b --modes qspec-w4a8 \
      --gammas 3 --max-gamma 3 --cost-gammas 0,3 --batches 16 --new-tokens 64 --repeats 3 \
      --weight-layout nk --norm-quant-kernel rmsnorm,none --time-budget 150 --commit "$COMMIT" \
      --out "$OUT/b16_nq.jsonl"
    ;;
  smema)
    # Issue 6: the shared-memory-operand Mosaic kernel (MgpuConfig(smem_a=True): the unpacked
    # tile in a double-buffered smem buffer, one wgmma in flight while the next tile unpacks;
    # run at e7d0f5f: correct, slower, mgpu_h200_smema.md): GPU tests first (a wrong barrier count would hang: timeout),
    # then its config sweep at M = 16 and the default kernel at the same M for comparison.
    step 200 smema_gpu_tests.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k "smem_a or other_configs"
    step 80 probe_mgpu_default_m1_16.log python3 experiments/probe_mgpu.py --out "$OUT/default" \
      --sweep default --ms 1,16 --no-baselines --commit "$COMMIT" --time-budget 70
    step 280 probe_mgpu_smem.log python3 experiments/probe_mgpu.py --out "$OUT/smem" --sweep smem \
      --ms 1,16 --no-baselines --commit "$COMMIT" --time-budget 260
    ;;
  cachewrite)
    # Issue 8: decode steps writing K/V once per step after a read-only forward (--cache-write
    # step; what gamma="auto" cycles do, and its plain cycles ran 1.02-1.09x the AR rows in every
    # sweep) vs per layer (64 scatters per 8B step): w4a16 AR at batch 1 / 16 / 64,
    # then at 32 x 8k; GPU test first (long context: the read-only attention merges two softmax parts).
    step 90 cachewrite_gpu_test.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k cache_write
    for v in layer step; do
      step 140 cachewrite_$v.log python3 experiments/sweep.py --models llama3-8b --batches 1,16,64 \
        --modes w4a16 --new-tokens 64 --repeats 3 --cache-write $v --time-budget 120 \
        --commit "$COMMIT" --out "$OUT/cachewrite_$v.jsonl"
    done
    for v in layer step; do
      step 105 cachewrite_8k_$v.log python3 experiments/sweep.py --models llama3-8b --batches 32 \
        --prompt-len 8064 --new-tokens 64 --modes w4a16 --repeats 1 --decode-timing slope \
        --cache-write $v --time-budget 95 --commit "$COMMIT" --out "$OUT/cachewrite_8k_$v.jsonl"
    done
    ;;
  cachewrite2)
    # Issue 8, after `cachewrite` (b5157b3: step 3.16 vs layer 2.65 ms at batch 1, 2.58 vs 2.63
    # at 16, 4.25 vs 4.19 at 64, 10.43 vs 12.45 at 32 x 8k): where batch 1 loses (XLA attention
    # below ATTN_MIN_BATCH) -- device time by kernel both ways; the GPU test with near-ties allowed
    # for QSpec (its first run parted at one near-tie in 12 sequences).
    step 300 cachewrite2_gpu_test.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k cache_write
    for v in layer step; do
      step 120 profile_b1_$v.log python3 experiments/profile_cycle.py --model llama3-8b --batch 1 \
        --configs w4a16 --new-tokens 64 --cache-write $v --commit "$COMMIT" --out "$OUT/prof_b1_$v"
    done
    ;;
  rotate)
    # Issue 8: what a rotated conversion's online Hadamard transforms (before o_proj and down_proj,
    # every layer, both modes: the converter rotates by default) cost an 8B step. The sweeps'
    # random-weight models skipped them until sweep.py --rotate. AR at batch 1 / 16 with and
    # without, then device time by kernel of a rotated batch-1 step.
    flag_ab rotate --rotate 130
    step 120 profile_b1_rotate.log python3 experiments/profile_cycle.py --model llama3-8b --batch 1 \
      --configs w4a16 --new-tokens 64 --rotate --commit "$COMMIT" --out "$OUT/prof_b1_rotate"
    rm -rf "$OUT/prof_b1_rotate"/trace_*
    ;;
  autob1)
    # Issue 8: gamma="auto" against w4a16 AR below ATTN_MIN_BATCH, where its read-only cycles ran
    # XLA's attention through a slow concatenate fusion until 31562b0 (cachewrite_h200.md; auto
    # was 1.02-1.09x the AR rows in every sweep before).
    step 290 autob1.log python3 experiments/sweep.py --models llama3-8b --batches 1,4 \
      --modes w4a16,qspec-w4a8 --gammas auto --max-gamma 3 --cost-gammas 0,1,3 --repeats 3 \
      --new-tokens 64 --time-budget 270 --commit "$COMMIT" --out "$OUT/autob1.jsonl"
    ;;
  b1kern)
    # Issue 8: two cuts to the batch-1 step's small XLA kernels that hlodump found (hlo_summary_
    # b1_w4a16_49b8d02.md): the Pallas attention kernel below ATTN_MIN_BATCH (XLA's attention:
    # 5 kernels + 2 cache-slice copies per layer) and CACHE_UPDATE=slice (the dropping scatter's
    # read-back + select: 2 kernels per layer). w4a16 AR at batch 1 / 4 under each, then batch 1
    # at a 2k prompt.
    i=0
    for flags in "" "--cache-update slice" "--attn-min-batch 1" "--attn-min-batch 1 --cache-update slice"; do
      i=$((i + 1))
      step 100 b1kern_$i.log python3 experiments/sweep.py --models llama3-8b --batches 1,4 \
        --modes w4a16 --new-tokens 64 --repeats 3 $flags --time-budget 90 \
        --commit "$COMMIT" --out "$OUT/b1kern_$i.jsonl"
    done
    for flags in "" "--attn-min-batch 1 --cache-update slice"; do
      i=$((i + 1))
      step 70 b1kern_$i.log python3 experiments/sweep.py --models llama3-8b --batches 1 \
        --prompt-len 2048 --modes w4a16 --new-tokens 64 --repeats 3 $flags --time-budget 60 \
        --commit "$COMMIT" --out "$OUT/b1kern_$i.jsonl"
    done
    ;;
  # prefetch: removed (L2 prefetch of the next GEMM's weights measured slower, prefetch_h200_7e1796b.md)
  mgpum256)
    # Issues 6 / 8: the Mosaic GEMM at M 65-256 (w4_mgpu.MAX_M 256; the model uses it up to
    # kernel_dispatch.MGPU_MAX_M = 64 then, XLA's GEMM above: verify passes of batch >= 32 at gamma 3,
    # AR at batch >= 128). GPU tests at the new M, then per-layer times at M 64 / 128 / 256
    # against XLA's GEMM over the same int4 weight and our Triton kernels (~6 min).
    step 150 mgpum256_gpu_tests.log python3 -m pytest -q -x -p no:warnings \
      tests/gpu/test_w4_mgpu_gpu.py -k "matches_reference and (100 or 128 or 256) or rejects"
    step 240 mgpum256_probe.log python3 experiments/probe_mgpu.py --out "$OUT/m256" \
      --ms 64,128,256 --sweep default --commit "$COMMIT" --time-budget 220
    ;;
  mgpuauto)
    # Issue 8: kernel_dispatch.mgpu_max_m (draft modes up to 256 rows on the Mosaic kernel, w4a16
    # up to 256 but 64 for gate/up) against one limit of 64 (the default before): the GPU test
    # with 160-row verify passes on the kernel, then 8B batch-256 AR and batch-64 gamma 1.
    step 120 mgpuauto_gpu_tests.log python3 -m pytest -q -x -p no:warnings \
      tests/gpu/test_w4_mgpu_gpu.py -k "auto_layout_on_this_gpu"
    for mm in auto 64; do
      flag=""; [ "$mm" = 64 ] && flag="--mgpu-max-m 64"
      step 190 mgpuauto_e2e_$mm.log python3 experiments/sweep.py --models llama3-8b \
        --batches 256,64 --modes w4a16,qspec-w4a8 --gammas 1 --max-gamma 1 --cost-gammas 0,1 \
        --new-tokens 32 --repeats 3 $flag --time-budget 175 --commit "$COMMIT" \
        --out "$OUT/mgpuauto_e2e_$mm.jsonl"
    done
    ;;
  defaults256)
    # Issues 6 / 8: the model's default Mosaic configs at 128 / 256 rows timed alone (the int8
    # gate/up at 256 rows took the bigm sweep's 128-column tile after 27efb4b; bigm_h200_c477f3c.md
    # sums per-shape sweep times: w4a8 140.7 vs w4a16's best 211.3 us per 8B layer, 1.50x), with
    # XLA's GEMM over int4 [N, K] (the model's w4a16 gate/up path above 64 rows) as the peer; GPU
    # tests of the default configs at 256 rows first.
    step 200 defaults256_gpu_tests.log python3 -m pytest -q -x -p no:warnings tests/gpu/test_w4_mgpu_gpu.py \
      -k "(matches_reference and 256 and not tile_m) or 70b_default"  # + the 70B shapes (M 1-256)
    step 260 defaults256.log python3 experiments/probe_mgpu.py --sweep default --ms 128,256 \
      --shapes 8b --modes w4a16,w4a8 --baseline-variants xlank_w4a16,xlank_w4a8 --iters 20 \
      --time-budget 240 --commit "$COMMIT" --out "$OUT/defaults256"
    ;;
  cachewrite3)
    # Issue 8: K/V written per layer ("layer", the default) vs once per step ("step") at today's
    # defaults (Pallas attention at every batch and the batch-1 slice update since a2e4e28; the
    # last comparison, cachewrite_h200.md, predates both: step 2.543 vs layer 2.653 ms at batch
    # 1). Two alternating runs of each at batch 1 and 4 (run-to-run spread is ~1-2%).
    for r in 1 2; do
      for v in layer step; do
        step 85 cachewrite3_${v}_$r.log python3 experiments/sweep.py --models llama3-8b \
          --batches 1,4 --modes w4a16 --new-tokens 64 --repeats 3 --cache-write $v \
          --time-budget 75 --commit "$COMMIT" --out "$OUT/cachewrite3_${v}_$r.jsonl"
      done
    done
    ;;
  bigmauto)
    # Issues 6 / 8: w4_mgpu.default_config retuned at 128 / 256 rows (bigm_h200_c477f3c.md: 128-wide
    # K steps for bf16 x, ~300 CTAs, tile_m 128 at 256 rows). GPU tests of the default configs at
    # M 100 / 128 / 256 and the 160-row verify in the model, then the mgpuauto e2e command at
    # batch 256 / 128 / 64: compare with mgpuauto_h200_c477f3c_auto.jsonl (same command, old configs).
    step 220 bigmauto_gpu_tests.log python3 -m pytest -q -x -p no:warnings tests/gpu/test_w4_mgpu_gpu.py \
      -k "(matches_reference and (100 or 128 or 256) and not tile_m) or (auto_layout_on_this_gpu and 40)"
    step 330 bigmauto_e2e.log python3 experiments/sweep.py --models llama3-8b \
      --batches 256,64,128 --modes w4a16,qspec-w4a8 --gammas 1 --max-gamma 1 --cost-gammas 0,1 \
      --new-tokens 32 --repeats 3 --time-budget 315 --commit "$COMMIT" --out "$OUT/bigmauto_e2e.jsonl"
    ;;
  resnorm2)
    # Issue 8: the fused residual + RMSNorm kernel was 2-3% slower at 4 warps (one program per
    # row, latency-bound: resnorm_h200_255f41e.md). Compiled correctness at 16 warps, then 8B
    # batch-1 w4a16 AR with it off and on at 4 / 8 / 16 warps.
    step 100 resnorm2_gpu_tests.log python3 -m pytest -q -x -p no:warnings \
      tests/gpu/test_residual_norm_gpu.py -k "compiled_kernel_matches_reference"
    step 55 resnorm2_off.log python3 experiments/sweep.py --models llama3-8b --batches 1 \
      --modes w4a16 --new-tokens 64 --repeats 3 --residual-norm off --time-budget 45 \
      --commit "$COMMIT" --out "$OUT/resnorm2.jsonl"
    for w in 4 8 16; do
      step 55 resnorm2_w$w.log python3 experiments/sweep.py --models llama3-8b --batches 1 \
        --modes w4a16 --new-tokens 64 --repeats 3 --residual-norm on --residual-norm-warps $w \
        --time-budget 45 --commit "$COMMIT" --out "$OUT/resnorm2_w$w.jsonl"
    done
    ;;
  bigm|bigm8)
    # Issues 6 / 8: the Mosaic kernel's default config at M 128 / 256 loses to XLA for gate/up
    # (its 64-column tiles each re-read x: mgpum256_h200_255f41e.md). Config sweep (probe_mgpu
    # --sweep bigm: 64-256-column tiles, x's rows split over CTAs (tile_m), 128 / 256-wide K
    # steps, split-K; every row checked against the reference) at M 128 and 256: bigm w4a16,
    # bigm8 w4a8 after the tile_m GPU tests.
    mode=w4a16
    if [ "$stage" = bigm8 ]; then
      mode=w4a8
      step 170 bigm_gpu_tests.log python3 -m pytest -q -x -p no:warnings \
        tests/gpu/test_w4_mgpu_gpu.py -k "tile_m"
    fi
    for m in 128 256; do
      step 270 bigm${m}_$mode.log python3 experiments/probe_mgpu.py --out "$OUT/bigm${m}_$mode" \
        --ms $m --sweep bigm --sweep-m $m --modes $mode --sweep-modes $mode --no-baselines \
        --commit "$COMMIT" --time-budget 250
    done
    rm -f "$OUT"/bigm*_w4a*.log
    ;;
  mgpum256e2e)
    # ... and end to end: 8B batch-256 AR (M 256) and batch-64 QSpec gamma 1 (its verify: M 128;
    # the cost table's gamma-1 cycle) with the model's limit at 64 (default) and 256 (~6 min).
    for mm in 64 256; do
      step 170 mgpum256_e2e_$mm.log python3 experiments/sweep.py --models llama3-8b \
        --batches 256,64 --modes w4a16,qspec-w4a8 --gammas 1 --max-gamma 1 --cost-gammas 0,1 \
        --new-tokens 32 --repeats 3 --mgpu-max-m $mm --time-budget 150 --commit "$COMMIT" \
        --out "$OUT/mgpum256_e2e_$mm.jsonl"
    done
    ;;
  resnorm)
    # Issue 8: the junction after o_proj / down_proj (GEMM epilogue + residual add + RMSNorm,
    # three XLA kernels at batch 1) as one Pallas kernel (kernel_dispatch.RESIDUAL_NORM). GPU
    # tests (kernel vs reference, on the Mosaic partials, QSpec lossless in the model), then 8B
    # w4a16 AR and w4a8 (the draft step) at batch 1 / 16, off vs on, then a batch-1 profile.
    step 150 resnorm_gpu_tests.log python3 -m pytest -q -x -p no:warnings \
      tests/gpu/test_residual_norm_gpu.py
    for v in off on; do
      step 110 resnorm_$v.log python3 experiments/sweep.py --models llama3-8b --batches 1,16 \
        --modes w4a16,w4a8 --new-tokens 64 --repeats 3 --residual-norm $v --time-budget 100 \
        --commit "$COMMIT" --out "$OUT/resnorm_$v.jsonl"
    done
    # The kernels of a batch-1 step with it (each junction one kernel instead of three?):
    step 120 resnorm_profile.log env XLA_FLAGS="--xla_dump_to=/tmp/hlo_rn --xla_dump_hlo_as_text \
      --xla_dump_hlo_module_re=.*decode_autoregressive.*" python3 experiments/profile_cycle.py \
      --model llama3-8b --batch 1 --configs w4a16 --new-tokens 16 --residual-norm on \
      --commit "$COMMIT" --out "$OUT/prof_rn"
    rm -rf "$OUT/prof_rn"/trace_*
    f=$(ls -S /tmp/hlo_rn/*after_optimizations.txt 2>/dev/null | head -1)
    [ -n "$f" ] && python3 experiments/hlo_summary.py --hlo "$f" --top 40 \
      --profile "$OUT/prof_rn/profile_llama3-8b_b1.json" --config w4a16 --out "$OUT/hlo_summary_b1_resnorm.md"
    rm -f "$OUT"/resnorm_o*.log "$OUT"/prof_rn/*.md  # the device returns at most 8 files
    ;;
  xpad)
    # Issue 8: x of < 8 rows handed to the Mosaic GEMM unpadded (w4_mgpu.X_PAD="tma": its TMA
    # tiles zero-fill the rows past M) instead of an XLA pad (a kernel of its own before o_proj
    # at batch < 8). GPU test (bit-equal outputs), then 8B w4a16 AR at batch 1 / 4, xla vs tma.
    step 120 xpad_gpu_tests.log python3 -m pytest -q -x -p no:warnings \
      tests/gpu/test_w4_mgpu_gpu.py -k x_pad
    for how in xla tma; do
      step 100 xpad_$how.log python3 experiments/sweep.py --models llama3-8b --batches 1,4 \
        --modes w4a16 --new-tokens 64 --repeats 3 --mgpu-x-pad $how --time-budget 90 \
        --commit "$COMMIT" --out "$OUT/xpad_$how.jsonl"
    done
    # Without the pad consumer, does XLA fuse each RMSNorm into one kernel (it runs two at
    # batch 1: a reduce to a scalar, then normalize + pad)? The kernels of a tma step:
    step 120 xpad_profile.log env XLA_FLAGS="--xla_dump_to=/tmp/hlo_xpad --xla_dump_hlo_as_text \
      --xla_dump_hlo_module_re=.*decode_autoregressive.*" python3 experiments/profile_cycle.py \
      --model llama3-8b --batch 1 --configs w4a16 --new-tokens 16 --mgpu-x-pad tma \
      --commit "$COMMIT" --out "$OUT/prof_xpad"
    rm -rf "$OUT/prof_xpad"/trace_*
    f=$(ls -S /tmp/hlo_xpad/*after_optimizations.txt 2>/dev/null | head -1)
    [ -n "$f" ] && python3 experiments/hlo_summary.py --hlo "$f" --top 60 \
      --profile "$OUT/prof_xpad/profile_llama3-8b_b1.json" --config w4a16 --out "$OUT/hlo_summary_b1_xpad.md"
    ;;
  hadsplit)
    # Issue 8: rotated models' online Hadamards cost +12% / +24% of an 8B step at batch 1 / 16
    # (rotate_h200_49b8d02.md). rotation "dense_split" does the float32 second GEMMs as one bf16
    # GEMM on three bf16 parts: the transform alone (widths 14336 / 4096, M 1-64, all impls),
    # then rotated AR at batch 1 / 16 with dense vs dense_split. (Measured at bc63be9: no faster,
    # and XLA:GPU folded the f32 -> bf16 -> f32 round trips, so not exact; removed after:
    # experiments/results/hadsplit_h200_bc63be9.md. Runs at bc63be9 only.)
    step 100 hadsplit_bench.log python3 experiments/bench_hadamard.py --widths 14336,4096 \
      --ms 1,16,64 --commit "$COMMIT" --out "$OUT"
    for impl in dense dense_split; do
      step 110 hadsplit_$impl.log python3 experiments/sweep.py --models llama3-8b --batches 1,16 \
        --modes w4a16 --new-tokens 64 --repeats 3 --rotate --hadamard-impl $impl --time-budget 100 \
        --commit "$COMMIT" --out "$OUT/hadsplit_$impl.jsonl"
    done
    ;;
  hlodump)
    # Issue 8: what the ~670 small XLA kernels of a batch-1 8B w4a16 step are (profile_b1_cachewrite_
    # h200_*.json: ~800 kernels per step, ~1 ms of 2.7 outside the GEMMs and the lm_head; 64
    # dynamic-update-slice, 31 dynamic-slice, ~31 concatenate fusions and 66 memcpys per step):
    # the optimized HLO of the decode programs (AR and gamma-3 QSpec, batch 1 and 16), gzipped,
    # to read offline (device time only for the compiles).
    for b in 1 16; do
      step 150 hlodump_b$b.log env XLA_FLAGS="--xla_dump_to=$OUT/hlo_b$b --xla_dump_hlo_as_text \
        --xla_dump_hlo_module_re=.*decode_(autoregressive|speculative).*" \
        python3 experiments/profile_cycle.py --model llama3-8b --batch $b --configs w4a16,qspec3 \
        --new-tokens 16 --commit "$COMMIT" --out "$OUT/prof_hlo_b$b"
      rm -rf "$OUT/prof_hlo_b$b"/trace_*
      find "$OUT/hlo_b$b" -type f ! -name '*after_optimizations.txt' -delete
      for pair in autoregressive:w4a16 speculative:qspec3; do  # each kernel -> fused ops, source line
        f=$(ls -S "$OUT/hlo_b$b"/*jit_decode_${pair%%:*}*after_optimizations.txt 2>/dev/null | head -1)
        [ -n "$f" ] && python3 experiments/hlo_summary.py --hlo "$f" --top 60 \
          --profile "$OUT/prof_hlo_b$b/profile_llama3-8b_b$b.json" --config "${pair##*:}" \
          --out "$OUT/hlo_summary_b${b}_${pair##*:}.md"
      done
      gzip -9 "$OUT/hlo_b$b"/*.txt
    done
    ;;
  diag)
    # Issue 6: where a decode GEMM's time goes (probe_mgpu.py --sweep diag): the model's GEMM
    # (kernel + XLA epilogue), the Mosaic kernel alone, the kernel with no unpack / MMA (TMA ring
    # alone) at M 1 / 16, both modes; then read-only structures (tiles, K steps, rings, splits).
    step 540 probe_mgpu_diag.log python3 experiments/probe_mgpu.py --out "$OUT/diag" --sweep diag \
      --ms 1,16 --commit "$COMMIT" --time-budget 520
    ;;
  lmhead2)
    # Issue 8, batch-1 step: int4 lm_head (the bf16 one is ~1 GB of the ~5 GB a step reads) in the
    # nk layout with the transposed store, A/B at batch 1 / 16, then device time by kernel of a
    # batch-1 w4a16 step (what the ~0.6 ms outside the GEMMs is made of).
    flag_ab lmhead --quantize-lm-head 150
    step 150 profile_b1.log python3 experiments/profile_cycle.py --model llama3-8b --batch 1 \
      --configs w4a16 --new-tokens 64 --commit "$COMMIT" --out "$OUT/prof_b1"
    ;;
  outmn2)
    # outmn after the jax-0.11 fix (949938e's transposed store used plgpu.transpose_ref on a
    # scratch ref, which 0.11.2 rejects; the model then ran XLA's GEMMs): GPU tests, then
    # batch 1 and batch 16 w4a16 AR on / off (the sweep now refuses to time XLA's path).
    step 120 outmn_gpu_tests.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k "out_mn"
    for v in on off; do
      flag="--mgpu-out-mn $v"
      step 150 outmn_e2e_$v.log python3 experiments/sweep.py --models llama3-8b --batches 1,16 \
        --modes w4a16 --new-tokens 64 --repeats 3 $flag --time-budget 130 --commit "$COMMIT" \
        --out "$OUT/outmn_e2e_$v.jsonl"
    done
    ;;
  persist)
    # Issue 6: persistent CTAs (MgpuConfig(units_per_cta=r): r (column tile, K split) units per
    # CTA through one continuous TMA pipeline; run at 949938e: correct, slower, mgpu_h200_persist.md): GPU tests first, then
    # the default kernel and the persist sweep at M = 16 (best config also timed at M = 1).
    step 220 persist_gpu_tests.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k "persistent or other_configs"
    step 80 probe_mgpu_default_m1_16.log python3 experiments/probe_mgpu.py --out "$OUT/default" \
      --sweep default --ms 1,16 --no-baselines --commit "$COMMIT" --time-budget 70
    step 240 probe_mgpu_persist.log python3 experiments/probe_mgpu.py --out "$OUT/persist" \
      --sweep persist --ms 1,16 --no-baselines --commit "$COMMIT" --time-budget 220
    ;;
  sweepgrid8b|sweepgrid1b)
    # Issue 8's whole grid: every mode, batch 1-256, gamma 3 and auto measured, cost tables at
    # gamma 0/1/3/5/7 (the rest interpolated) for the predicted curves. Resumable across calls:
    # the committed file is copied to $OUT first, the sweep skips the points it holds and appends;
    # copy it back into experiments/results/ after each call and commit before the next one.
    # The 1B grid times at least 1 s of runs per point (--min-time: its 64-token decodes take
    # ~50 ms, and with 3 repeats identical programs came out 15% apart at 1f8d2a6:
    # sweepgrid_h200_llama3.2-1b_1f8d2a6_3rep.jsonl).
    model=llama3-8b; mt=0; [ "$stage" = sweepgrid1b ] && model=llama3.2-1b && mt=1.0
    f="sweepgrid_h200_${model}.jsonl"
    [ -f "experiments/results/$f" ] && cp "experiments/results/$f" "$OUT/$f"
    step 560 "${stage}.log" python3 experiments/sweep.py --models "$model" \
      --batches 1,16,64,4,256,2,8,32,128 --modes w4a16,qspec-w4a8,w4a8,qspec-w4a4,w16 \
      --gammas 3,auto --max-gamma 7 --cost-gammas 0,1,3,5,7 --repeats 3 --new-tokens 64 \
      --min-time "$mt" --time-budget 500 --commit "$COMMIT" --out "$OUT/$f"
    ;;
  outmn)
    # Issue 6/8: the Mosaic GEMMs storing transposed partial sums (MgpuConfig(out_mn=True); at
    # 949938e it failed to trace on jax 0.11.2, fixed since: stage outmn2, outmn_h200.md), so XLA can fuse each GEMM's epilogue into its consumer: GPU tests, then
    # batch 1 / 16 w4a16 AR and batch-16 gamma 3 with and without it (nk layout).
    step 150 outmn_gpu_tests.log python3 -m pytest tests/gpu/test_w4_mgpu_gpu.py -q -rA \
      -p no:cacheprovider -k "out_mn"
    for v in on off; do
      flag="--mgpu-out-mn $v"
      step 75 outmn_e2e_b1_$v.log python3 experiments/sweep.py --models llama3-8b --batches 1 \
        --modes w4a16 --new-tokens 64 --repeats 3 $flag --time-budget 60 --commit "$COMMIT" \
        --out "$OUT/outmn_e2e_$v.jsonl"
      step 125 outmn_e2e_b16_$v.log python3 experiments/sweep.py --models llama3-8b --batches 16 \
        --modes w4a16,qspec-w4a8 --gammas 3 --max-gamma 3 --cost-gammas 0,3 --new-tokens 64 \
        --repeats 3 $flag --time-budget 100 --commit "$COMMIT" --out "$OUT/outmn_e2e_$v.jsonl"
    done
    ;;
  longnk)
    # Issue 9 in the default (nk) layout: QSpec gamma 3 with the 4 + 2044 window at 16 x 32k (its
    # w4a16 AR point came back from longe2e2k at e7d0f5f, whose QSpec point ran out of time), then
    # AR + QSpec gamma 3 with the 4 + 1020 window at 32 x 8k.
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    step 300 longnk_32k.log python3 experiments/sweep.py --models llama3-8b --batches 16 \
      --prompt-len 32512 --new-tokens 128 --modes qspec-w4a8 --gammas 3 --max-gamma 3 \
      --cost-gammas 0,3 --repeats 1 --decode-timing slope --draft-window 4:2044 \
      --time-budget 290 --commit "$COMMIT" --out "$OUT/longnk_h200.jsonl"
    e2e_window 250 longnk_8k.log 32 8064 4:1020 "$OUT/longnk_h200.jsonl"
    ;;
  chunktest)
    step 200 chunk_gpu_tests.log python3 -m pytest tests/gpu -q -rA -p no:cacheprovider \
      -k "chunked_prefill"
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# One GPU call that measures what the CPU cannot, each part under its own time limit and all of
# them inside BUDGET seconds (default 520: the device tool allows 600 s a call, and setting up its
# packages takes about 40), so a slow part cannot eat the rest. Results: JSON and logs under $OUT.
# On an H100 (2026-12-05) "dit torchrun extract ae" took 326 s with the DiT at 4k tokens only; with
# the three token counts and the cuDNN A/B everything but autotune fits one call (autotune, last,
# gets what is left); PARTS picks some, for two calls. Since the compiled h3ae rows of "extract"
# (EX_COMPILED, up to 180 s each, never run on a GPU yet) that part may fill a call of its own.
#
#   source .whl/device-setup.sh && bash benchmarks/gpu_session.sh     # on the GPU machine
#   PARTS="extract" bash ...; PARTS="dit torchrun ae cudnn autotune" bash ...   # the same in two calls
#   TOY=1 bash benchmarks/gpu_session.sh     # the same steps at toy size on the CPU: the dry run before a GPU call
#   TRAIN_VARIANTS="engine.deepspeed=zero1;model.text_cond=true" ...   # other `ldm train` runs (part "variants")
#   AT_ARGS="--tokens 4096 --batches 8 --sample-batches 16" PARTS=autotune ...  # max-autotune at one size only
#
# Parts (PARTS, in this order; default all): dit, torchrun, variants, extract, ae, cudnn, autotune.
#
# 1. `ldm train`'s own MFU for dit-XL at 4096 tokens (kl2d-f8c4 latents of 16x256x256 clips) and
#    where its step time goes (`--ldm-train-profile`), next to the bare train step of ours and of
#    the plain DiT reference at the same size (benchmarks/gpu_dit.py);
# 2. extraction's loop rate against the autoencoder's own batched encode, for five families, h3ae
#    again with its encoder compiled (both sides; EX_COMPILED) and at the batch ldm extract picks for it
#    (EX_BATCHED), and two of them from larger videos (every clip resized, as real videos are; EX_RESIZED)
#    (benchmarks/extraction.py: the README's extraction clips/s per autoencoder);
# 3. every full-size autoencoder's encode / decode FPS and peak memory (benchmarks/gpu_check.py),
#    then four conv autoencoders again with cuDNN's per-shape algorithm search on (an A/B for the
#    inference verbs' default, which leaves it off);
# 4. last, in the time left of BUDGET seconds: our DiT step compiled with max-autotune (Triton
#    matmuls with fused epilogues) against the default mode (model.compile_mode); it compiles for minutes;
# and a short `ldm train` under torchrun, with shard reader processes (spawned on CUDA), that must
# exit cleanly (NCCL teardown).
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
# a part's limit: its own, or what is left of BUDGET seconds for the whole call if less (at least 1)
left() { local rest=$(( BUDGET - $(date +%s) + T0 )); [ "$rest" -lt "$1" ] && echo $(( rest > 1 ? rest : 1 )) || echo "$1"; }
BUDGET=${BUDGET:-520}
PARTS=" ${PARTS:-dit torchrun variants extract ae cudnn autotune} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
if [ -z "${TOY:-}" ]; then
  DEV=cuda; PY=${PY:-python3}; export OMP_NUM_THREADS=4
  CLIPS=64; FRAMES=16; SIZE=256; AE=kl2d-f8c4; DIT=dit-XL; SMALL_DIT=dit-S; BATCH=8; STEPS=40
  DIT_ARGS="--tokens 1024,4096,16384 --batches 32,8,2 --sample-batches 64,16,4 --steps 4 --warmup 2"
  EX_AES="causal3d-f4x8c4 kl2d-f8c4 ivvae-z16 h3ae-8x32x32 mtcvae-c4"  # mtcvae last: it gets L2_SLOW
  # -1: ldm extract's default (15 on 16 cores; the same steady rate as 8 on an H100, 2026-12-06)
  EX_ARGS="--clips 48 --frames 17 --size 256 --workers 0,-1 --batch-sizes 8"
  EX_RESIZED="h3ae-8x32x32@384 causal3d-f4x8c4@384"  # again from 384x384 videos: every clip resized, as real videos
  # h3ae with `ldm extract --compile true`: its 701 small kernels a batch (bf16 eager, counted 2026-12-07)
  # fused (+c), and replayed as CUDA graphs (+r: --compile-mode reduce-overhead); each compiles twice (the
  # encode alone, the extraction)
  EX_COMPILED="h3ae-8x32x32+c h3ae-8x32x32+r"
  # h3ae at the batch ldm extract picks on an 80 GB GPU (64): its small kernels' launches amortised
  EX_BATCHED="h3ae-8x32x32%64"; EX_BATCH_ARGS="--frames 17 --size 256 --workers -1"
  AE_ARGS="--frames 17 --size 256"
  AB_ARGS="--frames 17 --size 256 --autoencoders causal3d-f4x8c16,ivvae-z16,kl2d-f8c4,h3ae-8x32x32"
  L1=300; L2=40; L2_SLOW=90; L3=110; L4=60; L5=200  # mtcvae-c4 encodes ~60 fps: 40 s cut it short on an H100
  L2_COMPILED=180  # a guess: not compiled on a GPU yet
else
  DEV=cpu; PY=${PY:-.venv/bin/python}; export OMP_NUM_THREADS=2
  CLIPS=4; FRAMES=8; SIZE=32; AE=kl2d-f8c4-debug; DIT=dit-debug; SMALL_DIT=dit-debug; BATCH=2; STEPS=4
  DIT_ARGS="--tiny --tokens 64 --batches 2 --sample-batches 2 --steps 1 --warmup 1 --compile-backend aot_eager"
  EX_AES="causal3d-f4x8c4-debug kl2d-f8c4-debug"
  EX_ARGS="--clips 4 --frames 9 --size 32 --workers 0 --batch-sizes 2"
  EX_RESIZED="kl2d-f8c4-debug@48"
  EX_COMPILED="h3ae-8x32x32-debug+r"
  EX_BATCHED="kl2d-f8c4-debug%4"; EX_BATCH_ARGS="--frames 9 --size 32 --workers 0"
  AE_ARGS="--debug --frames 9 --size 32 --autoencoders kl2d-f8c4-debug,hivae-s-debug"
  AB_ARGS="--debug --frames 9 --size 32 --autoencoders kl2d-f8c4-debug"
  L1=600; L2=300; L2_SLOW=300; L2_COMPILED=300; L3=300; L4=300; L5=300
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if want dit || want torchrun || want variants; then
stamp "shards for ldm train: $CLIPS clips ${FRAMES}x${SIZE}x${SIZE} through $AE"
timeout $(left 90) $PY -m launch.cli data synth --output "$OUT/videos" --num $CLIPS --frames $FRAMES --size $SIZE --quiet 2>&1 | tail -2
timeout $(left 120) $PY -m launch.cli extract --autoencoder $AE --input "$OUT/videos" --output "$OUT/latents" --frames $FRAMES \
  --height $SIZE --width $SIZE --device $DEV --text-encoder builtin 2>&1 | grep -v Warning | tail -2
fi

if want dit; then
stamp "gpu_dit: ours vs the reference, then ldm train (profiled)"
timeout $(left $L1) $PY benchmarks/gpu_dit.py --device $DEV $DIT_ARGS --modes ref-autocast,ours-bf16,ref-bf16 \
  --ldm-train "$OUT/latents" --ldm-train-dit $DIT --ldm-train-batch $BATCH --ldm-train-steps $STEPS \
  --ldm-train-profile 3 --json "$OUT/gpu_dit.json" 2>&1 | grep -v Warning | tail -40
fi

if want torchrun; then
stamp "ldm train under torchrun (NCCL), a few steps of a small DiT with 2 spawned shard readers: a clean exit, no traceback"
timeout $(left 120) $PY -m torch.distributed.run --nproc_per_node 1 -m launch.cli train \
  --config launch/configs/train-debug.yaml data.shards="$OUT/latents" output="$OUT/train-torchrun" \
  model.dit=$SMALL_DIT data.batch_size=$BATCH data.num_workers=2 steps=4 log_every=2 save_every=4 > "$OUT/torchrun.log" 2>&1
echo "torchrun exit code $? ; tracebacks: $(grep -c Traceback "$OUT/torchrun.log")"; tail -2 "$OUT/train-torchrun/log.jsonl"
fi

# more `ldm train` runs on the same shards (about 100 s each), e.g.
#   TRAIN_VARIANTS="engine.deepspeed=zero1;model.text_cond=true;data.num_workers=4"
# default: the built-in ZeRO-2, then ZeRO-2 with each gradient kept in its own tensor
# (`contiguous_gradients: false`), with the same settings. On the CPU the second's DeepSpeed part of
# the backward pass is 58 % fewer operators (one copy per parameter tensor instead of two), with the
# same losses to the bit on 1 and 2 ranks; whether that is a faster GPU step is what this measures
IFS=';' read -ra VARIANTS <<< "${TRAIN_VARIANTS-engine.deepspeed=zero2;engine.deepspeed=benchmarks/zero2-separate-grads.json}"
want variants || VARIANTS=()
for i in "${!VARIANTS[@]}"; do
  stamp "ldm train variant: ${VARIANTS[$i]}"
  # shellcheck disable=SC2086
  timeout $(left 150) $PY -m launch.cli train --config launch/configs/train-debug.yaml data.shards="$OUT/latents" \
    output="$OUT/train-variant-$i" model.dit=$DIT data.batch_size=$BATCH steps=$STEPS log_every=$(( STEPS / 2 )) \
    save_every=$(( 10 * STEPS )) model.text_cond=false universal_checkpoints=false ${VARIANTS[$i]} 2>&1 \
    | grep -v Warning | tail -3
  tail -1 "$OUT/train-variant-$i/log.jsonl" 2>/dev/null
done

if want extract; then
stamp "extraction vs encode, each autoencoder under its own limit"
# NAME; NAME@S: from SxS videos; NAME%B: at batch B, 3B clips; NAME+c / +r: the encoder compiled (+r: CUDA graphs)
for E in $EX_AES $EX_COMPILED $EX_BATCHED $EX_RESIZED; do
  A=${E%%[@%+]*}; TAG=$A; RUN=($EX_ARGS); LIM=$L2; [[ $A == mtcvae* ]] && LIM=$L2_SLOW
  if [[ $E == *@* ]]; then TAG="$A-from${E#*@}"; RUN+=(--source-size "${E#*@}"); fi
  if [[ $E == *%* ]]; then B=${E#*%}; TAG="$A-b$B"; RUN=($EX_BATCH_ARGS --clips $(( 3 * B )) --batch-sizes "$B"); fi
  if [[ $E == *+c ]]; then TAG="$A-compiled"; RUN+=(--compile); LIM=$L2_COMPILED; fi
  if [[ $E == *+r ]]; then TAG="$A-cudagraphs"; RUN+=(--compile --compile-mode reduce-overhead); LIM=$L2_COMPILED; fi
  timeout $(left $LIM) $PY benchmarks/extraction.py --device $DEV "${RUN[@]}" --autoencoders $A --json \
    2>/dev/null > "$OUT/extraction-$TAG.json"
  $PY -c "import json, sys; r = json.load(open(sys.argv[1]))[0]; print(r['autoencoder'], 'from', r['source_size'], \
'pixel videos, compiled', r['compile'], 'encode', r['encode_clips_per_s'], \
'extract (workers, clips/s, vs encode, fill s, steady vs encode, waited for decoding)', [(e['workers'], \
round(e['extract_clips_per_s'], 1), round(e['efficiency_vs_encode'], 2), round(e['fill_s'], 2), \
round(e['steady_efficiency_vs_encode'], 2), e['decode_wait_share'] and round(e['decode_wait_share'], 2)) for e in r['extract']]); \
[print('  workers', e['workers'], 'loop ms/clip', {k: round(v, 2) for k, v in e['loop_ms_per_clip'].items()}, \
'compile s', e['compile_s']) for e in r['extract']]; \
h = r['host']; print('  host', h['cpu_model'], h['cpus'], 'cores', h['usable_cores'], 'usable, quota', h['cgroup_cpu_quota'], \
'load', h['loadavg_1m'], 'one clip decoded in-process', {k: round(v, 2) for k, v in h['decode_one_clip'].items()})" \
    "$OUT/extraction-$TAG.json" 2>/dev/null || echo "$TAG: no result (timed out or failed)"
done
fi

if want ae; then
stamp "autoencoders: encode / decode FPS, peak memory"
timeout $(left $L3) $PY benchmarks/gpu_check.py --device $DEV --skip-pipeline $AE_ARGS --json "$OUT/autoencoders.json" \
  2>&1 | grep -v Warning | tail -30
fi

if want cudnn; then
stamp "conv autoencoders with cuDNN's per-shape algorithm search (torch.backends.cudnn.benchmark): A/B"
timeout $(left $L4) $PY benchmarks/gpu_check.py --device $DEV --skip-pipeline $AB_ARGS --cudnn-benchmark \
  --json "$OUT/autoencoders-cudnn-benchmark.json" 2>&1 | grep -v Warning | tail -8
fi

if want autotune; then
stamp "gpu_dit: inductor's default vs max-autotune (model.compile_mode) at the same size, in the time left"
timeout $(left $L5) $PY benchmarks/gpu_dit.py --device $DEV ${AT_ARGS:-$DIT_ARGS} --modes ours-bf16,ours-autotune \
  --json "$OUT/gpu_dit_autotune.json" 2>&1 | grep -v Warning | tail -6
fi
stamp "done"

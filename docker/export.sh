#!/usr/bin/env bash
# The `export` service of docker-compose.yml, on the GPU host: downloads the weights by hub id,
# exports the ONNX graphs to /exports (the `exports` volume), writes the served repository for
# $TARGET to /models (the `models` volume), builds its TensorRT plans on this GPU, checks it.
#
# Exports are cached on the volume: a model whose /exports/<model>/1/meta.json exists is not
# exported again unless FORCE_EXPORT=1. The plans step skips plans already built.
set -euo pipefail

TARGET=${TARGET:-gpu-tensorrt}
GPUS=${GPUS:-1}
INSTANCES=${INSTANCES:-2}
MAX_BATCH=${MAX_BATCH:-64}
ASR_ENGINES=${ASR_ENGINES:-sensevoice,parakeet}
WITH_SPEAKER=${WITH_SPEAKER:-1}
FORCE_EXPORT=${FORCE_EXPORT:-0}
SENSEVOICE_MODEL=${SENSEVOICE_MODEL:-iic/SenseVoiceSmall}
PARAKEET_MODEL=${PARAKEET_MODEL:-nvidia/parakeet-tdt-0.6b-v2}
SPEAKER_MODEL=${SPEAKER_MODEL:-iic/speech_eres2netv2w24s4ep4_sv_zh-cn_16k-common}
EXPORTS=${EXPORTS_DIR:-/exports}  # the `exports` volume
MODELS=${MODELS_DIR:-/models}  # the `models` volume
# Written into $MODELS when the repository is complete and checked, removed while it is being
# rewritten: the Kubernetes server pods wait for it (deploy/kubernetes).
DONE_MARKER=.export-complete

say() { printf '\n[export] %s\n' "$*"; }
run() { printf '[export] $ %s\n' "$*"; "$@"; }

# engine_wanted NAME: is NAME in the comma-separated $ASR_ENGINES?
engine_wanted() { case ",${ASR_ENGINES// /}," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# export_once MODEL DIRS ARGS...: `tritonasr export MODEL ARGS...` unless the export is cached,
# that is unless every served model it writes (DIRS, comma-separated) has its 1/meta.json.
export_once() {
    local model=$1 dirs=$2 dir cached=1
    shift 2
    for dir in ${dirs//,/ }; do
        [ -f "$EXPORTS/$dir/1/meta.json" ] || cached=0
    done
    if [ "$FORCE_EXPORT" != 1 ] && [ "$cached" = 1 ]; then
        say "$model: cached in $EXPORTS ($dirs; FORCE_EXPORT=1 exports again)"
        return 0
    fi
    say "$model: exporting"
    run tritonasr export "$model" "$@" --model-repository "$EXPORTS"
}

# not_served MODEL DIRS WHY: a model left out of this deployment; warns when an earlier run
# exported it, since the repository build serves whatever /exports holds.
not_served() {
    local model=$1 dirs=$2 why=$3 dir
    say "$model: skipped ($why)"
    for dir in ${dirs//,/ }; do
        if [ -d "$EXPORTS/$dir" ]; then
            echo "[export] warning: $EXPORTS/$dir holds an earlier export, which the repository build" \
                 "still includes; to serve without $model:" \
                 "docker-compose run --rm export rm -rf $EXPORTS/$dir (the build then prunes it from $MODELS)" >&2
        fi
    done
}

case "$TARGET" in
    gpu-tensorrt | gpu-onnxruntime) ;;
    *) echo "[export] error: TARGET must be gpu-tensorrt or gpu-onnxruntime, not '$TARGET'" >&2; exit 2 ;;
esac
if ! engine_wanted sensevoice && ! engine_wanted parakeet; then
    echo "[export] error: ASR_ENGINES='$ASR_ENGINES' names no engine: use sensevoice, parakeet or both" >&2
    exit 2
fi

say "target $TARGET, $GPUS GPU(s), $INSTANCES instance(s) per GPU, max batch $MAX_BATCH," \
    "engines $ASR_ENGINES, speaker $WITH_SPEAKER"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
fi

mkdir -p "$MODELS"
rm -f "$MODELS/$DONE_MARKER"
export_once vad vad

if engine_wanted sensevoice; then
    export_once sensevoice sensevoice --model "$SENSEVOICE_MODEL"
else
    not_served sensevoice sensevoice "ASR_ENGINES=$ASR_ENGINES"
fi

if engine_wanted parakeet; then
    export_once parakeet parakeet_encoder,parakeet_decoder --model "$PARAKEET_MODEL"
else
    not_served parakeet parakeet_encoder,parakeet_decoder "ASR_ENGINES=$ASR_ENGINES"
fi

if [ "$WITH_SPEAKER" != 0 ]; then
    export_once speaker speaker --model "$SPEAKER_MODEL"
else
    not_served speaker speaker "WITH_SPEAKER=0"
fi

say "writing the $TARGET repository to $MODELS"
run tritonasr repo build --target "$TARGET" --source "$EXPORTS" --output "$MODELS" \
    --gpus "$GPUS" --instances "$INSTANCES" --max-batch "$MAX_BATCH"

if [ "$TARGET" = gpu-tensorrt ]; then
    say "building the TensorRT plans on this GPU (plans already built are kept)"
    run tritonasr repo plans "$MODELS"
fi

say "checking $MODELS"
run tritonasr repo check "$MODELS"
date -u +%FT%TZ >"$MODELS/$DONE_MARKER"

say "done: start the server with \`docker-compose up -d triton prometheus grafana\`"

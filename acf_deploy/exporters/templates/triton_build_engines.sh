#!/bin/sh
# Builds the TensorRT plans of version {{version}}, written by acf-deploy {{acf_version}}.
# A plan runs only on the TensorRT version and the GPU model it was built with: run this ON THE
# SERVING HOST, inside the very tritonserver container image that will serve the repository, e.g.
#   docker run --rm --gpus all -v "$PWD":/models {{container}} sh /models/{{build_script}}
# (trtexec ships in that image). Each plan is written beside its model.onnx, then renamed into place.
set -eu
REPO="$(cd "$(dirname "$0")" && pwd)"
TRTEXEC="${TRTEXEC:-{{trtexec}}}"
{{commands}}
echo 'done: start (or reload) tritonserver on this repository'

# acf-deploy on a GPU: TensorRT engines and the trt / ort backends.
#
# NVIDIA's TensorRT image brings CUDA, cuDNN, TensorRT and its Python bindings, which PyPI alone cannot
# (the TensorRT libraries come from NVIDIA's index). Pick another release with
# --build-arg TRT_IMAGE=nvcr.io/nvidia/tensorrt:<yy.mm>-py3.
#
#   docker build -t acf-deploy .
#   docker run --gpus all --rm acf-deploy quickstart --backend trt
ARG TRT_IMAGE=nvcr.io/nvidia/tensorrt:25.10-py3
FROM ${TRT_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/acf-deploy
COPY pyproject.toml README.md ./
COPY acf_deploy ./acf_deploy

# The [gpu] extra brings onnxruntime-gpu. Plain onnxruntime installed beside it hides the CUDA and
# TensorRT execution providers, so the build fails if anything pulled it in.
RUN python3 -m pip install ".[gpu]" \
 && if python3 -m pip show onnxruntime >/dev/null 2>&1; then echo "plain onnxruntime got installed" >&2; exit 1; fi \
 && python3 -c "import tensorrt, onnxruntime; print('TensorRT', tensorrt.__version__, onnxruntime.get_available_providers())"

WORKDIR /work
ENTRYPOINT ["acf-deploy"]
CMD ["--help"]

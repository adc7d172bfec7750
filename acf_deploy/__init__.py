"""acf-deploy: trained Attentive Contractive Flows to verified ONNX / TensorRT deployments."""

__version__ = "0.1.0"

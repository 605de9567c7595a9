"""Making engine folders ahead of serving: ONNX export checked against PyTorch, TensorRT plans, the
manifest that says what a folder fits, the build-engine command, and the container's start decision."""

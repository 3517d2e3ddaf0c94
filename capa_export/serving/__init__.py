"""Serving built engines with NVIDIA Triton Inference Server: a model repository for an engine
folder (triton_repo), the Python-backend model it names (triton_model, with the Triton-free request
handling in requests) and a launcher for the tritonserver that nvidia-pytriton ships (serve)."""

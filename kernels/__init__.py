"""pm_kernels: fused GPU kernels (Triton), each with its PyTorch reference.

Not built yet: it arrives with the GPU fast-path issue. The package exists so the installed
layout (kernels/ installs as pm_kernels) is fixed from the start.
"""

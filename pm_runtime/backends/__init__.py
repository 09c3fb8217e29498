"""Backends: one file each, one interface (base.py). onnxruntime and tensorrt import no torch;
torch is the reference (needs the `train` extra). See base.BACKENDS and base.AUTO_ORDER."""

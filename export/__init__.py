"""pm_export: bake concept tables, export the networks to ONNX (TensorRT plans where TensorRT is
installed), validate every part against PyTorch and write a bundle (`pm-export`).

  bake.py            concept.pt (+ optional other reference photo) -> concept table
  onnx_export.py     the three networks wrapped to their specs' signatures, torch.onnx.export
  fp16.py            fp16 conversion with the fixed fp32 block list
  validate.py        onnxruntime vs PyTorch on fresh random inputs, tolerances
  tensorrt_build.py  TensorRT 10 plans (written against the documented API; not run here)
  build.py           the export flow: temp folder, manifest, rename; concept-only export
  cli.py             the pm-export command line
"""

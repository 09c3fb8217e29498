"""pm_export: baking concept tables and exporting the networks to ONNX / TensorRT (`pm-export`).

Not built yet: it arrives with the export issue. The package exists so the installed layout
(export/ installs as pm_export) is fixed from the start.
"""

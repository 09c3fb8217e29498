"""PersonaMagic runtime: concept formats, stage schedule, noise, schedulers and (behind the
`train` extra) the PyTorch modules, trainer and reference generator.

The top-level package imports no torch; `pm_runtime.modeling` and `pm_runtime.train` do.
"""

__version__ = "0.5.0"

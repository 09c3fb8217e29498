"""The step graph: classifier-free guidance + the scheduler update of one denoising step + the next
UNet input, as a small fp32 ONNX graph (pm_runtime.specs STEP). GPU backends run it between UNet
calls so that nothing returns to the host during the loop (pm_runtime/backends/device_loop.py);
pm-export builds it into `step.plan` next to the networks' TensorRT plans.

With u, c the two halves of noise_pred, x = sample and the `coef` row (STEP_COEF_COLUMNS:
a, b, c, d, e, f, g, h, k, m, guidance, clip, s):
    o    = u + guidance * (c - u)
    x0   = min(max(a*x + b*o, -clip), clip)          (clip = inf: no clamp)
    eps  = c*x + d*o
    prev = e*x + f*o + g*x0 + h*eps + k*x0_prev + m*noise
    unet_sample = [s*prev; s*prev]
which is pm_runtime/schedulers/linear.py's `step` (tested against every scheduler) after the guidance
combine of the host loop. Built with onnx.helper (no torch), validated under onnxruntime against
that numpy reference on random inputs with real coefficient rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pm_runtime.specs import STEP, STEP_COEF_COLUMNS, NetworkSpec

from .onnx_ir import oldest_ir_version

OPSET = 17


def step_model(spec: NetworkSpec) -> onnx.ModelProto:
    """The step graph for `spec` (network_specs(dims)[STEP]): dynamic batch and latent sides."""
    if spec.name != STEP:
        raise ValueError(f"not the step spec: {spec.name}")

    def value_info(t):
        return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape))

    n_coef = len(STEP_COEF_COLUMNS)
    cols = [f"coef_{c}" for c in STEP_COEF_COLUMNS]
    a, b, c, d, e, f, g, h, k, m, guidance, clip, scale = cols
    nodes = [
        helper.make_node("Split", ["coef", "coef_split"], cols, axis=0),  # 13 tensors of shape (1,)
        helper.make_node("Split", ["noise_pred"], ["uncond", "cond"], axis=0),  # equal halves
        helper.make_node("Sub", ["cond", "uncond"], ["delta"]),
        helper.make_node("Mul", [guidance, "delta"], ["delta_g"]),
        helper.make_node("Add", ["uncond", "delta_g"], ["o"]),
    ]

    def axpby(p, x, q, y, out):  # out = p*x + q*y
        nodes.extend([helper.make_node("Mul", [p, x], [f"{out}_1"]), helper.make_node("Mul", [q, y], [f"{out}_2"]),
                      helper.make_node("Add", [f"{out}_1", f"{out}_2"], [out])])

    axpby(a, "sample", b, "o", "x0_raw")
    nodes += [helper.make_node("Neg", [clip], ["neg_clip"]),
              helper.make_node("Max", ["x0_raw", "neg_clip"], ["x0_low"]),
              helper.make_node("Min", ["x0_low", clip], ["x0"])]
    axpby(c, "sample", d, "o", "eps")
    axpby(e, "sample", f, "o", "p1")
    axpby(g, "x0", h, "eps", "p2")
    axpby(k, "x0_prev", m, "noise", "p3")
    nodes += [helper.make_node("Add", ["p1", "p2"], ["p12"]),
              helper.make_node("Add", ["p12", "p3"], ["prev_sample"]),
              helper.make_node("Mul", [scale, "prev_sample"], ["scaled"]),
              helper.make_node("Concat", ["scaled", "scaled"], ["unet_sample"], axis=0)]
    split = helper.make_tensor("coef_split", TensorProto.INT64, [n_coef], [1] * n_coef)
    graph = helper.make_graph(nodes, "pm_step", [value_info(t) for t in spec.inputs],
                              [value_info(t) for t in spec.outputs], initializer=[split])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="pm-export step graph")
    oldest_ir_version(model)  # not the installed onnx's newest IR: older onnxruntimes refuse that
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """numpy float64 reference of the step graph (what it must compute)."""
    co = dict(zip(STEP_COEF_COLUMNS, (float(v) for v in feeds["coef"])))
    noise_pred = feeds["noise_pred"].astype(np.float64)
    n = noise_pred.shape[0] // 2
    u, cond = noise_pred[:n], noise_pred[n:]
    o = u + co["guidance"] * (cond - u)
    x, x0_prev, noise = (feeds[k].astype(np.float64) for k in ("sample", "x0_prev", "noise"))
    x0 = np.clip(co["x0_x"] * x + co["x0_o"] * o, -co["clip"], co["clip"])
    eps = co["eps_x"] * x + co["eps_o"] * o
    prev = (co["prev_x"] * x + co["prev_o"] * o + co["prev_x0"] * x0 + co["prev_eps"] * eps
            + co["prev_x0prev"] * x0_prev + co["prev_noise"] * noise)
    s = co["next_input_scale"] * prev
    return {"prev_sample": prev, "x0": x0, "unet_sample": np.concatenate([s, s])}


def write_step_graph(spec: NetworkSpec, path: Path) -> Path:
    """Write the step graph (a few KB, weights none) to `path` atomically."""
    from pm_runtime.concept_table import atomic_write_bytes

    atomic_write_bytes(step_model(spec).SerializeToString(), Path(path))
    return Path(path)


def validate_step_graph(spec: NetworkSpec, path: Path, log=lambda m: None) -> list:
    """The written graph under onnxruntime (CPU) against reference_step: random inputs at two
    shapes, the coefficient rows of a 10-step DPM-Solver++ and a clamped DDIM run; fp32 tolerance.
    Returns export.validate Checks; any over tolerance is a UserError."""
    import secrets

    from pm_runtime import schedulers
    from pm_runtime.backends.device_loop import step_coefficients
    from pm_runtime.schedulers.linear import linear_steps

    from .validate import TOLERANCES, Check, decide, ort_session

    atol, rtol = TOLERANCES["fp32"]
    seed = secrets.randbits(31)
    rng = np.random.default_rng(seed)
    config = {"clip_sample": True, "clip_sample_range": 1.0}
    rows = np.concatenate([step_coefficients(linear_steps(schedulers.make_tables(name, config, 10)), 7.5)
                           for name in ("dpmpp-2m", "ddim")])
    sess = ort_session(path)
    checks = []
    for axes in ({"batch": 1, "latent_height": 32, "latent_width": 32},
                 {"batch": 2, "latent_height": 40, "latent_width": 48}):
        max_abs = ref_max = 0.0
        for coef in rows:
            feeds = spec.dummy_inputs(rng, "opt", **axes)
            feeds["coef"] = coef
            got = dict(zip(spec.output_names, sess.run(spec.output_names, feeds)))
            for name, want in reference_step(feeds).items():
                diff = float(np.abs(got[name] - want).max()) if np.isfinite(got[name]).all() else float("inf")
                max_abs, ref_max = max(max_abs, diff), max(ref_max, float(np.abs(want).max()))
        checks.append(Check(STEP, "fp32", axes, max_abs, max_abs / max(ref_max, 1e-12), ref_max, atol, rtol, seed))
    return decide(checks, log)

"""PyTorch weights as optional bundle components (format "torch"): what pm-export writes with
`--target torch` and what the torch-cuda backend loads, so the GPU fast path needs only the bundle.

One component per network: `torch/NAME.fp16.safetensors` (the Hugging Face module's state dict,
fp16; the VAE decoder's file holds the VAE's decoder half, the VAE encoder's its encoder half) with the module's class and config in the component's
details. Classes come from a fixed list: a manifest can never name code to import.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..specs import SAFETY_CHECKER, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER

FORMAT = "torch"
CLASSES = {UNET: "diffusers.UNet2DConditionModel", TEXT_ENCODER: "transformers.CLIPTextModel",
           VAE_DECODER: "diffusers.AutoencoderKL", VAE_ENCODER: "diffusers.AutoencoderKL",
           SAFETY_CHECKER: "diffusers.StableDiffusionSafetyChecker"}
KEEP_PREFIXES = {VAE_DECODER: ("decoder.", "post_quant_conv."), VAE_ENCODER: ("encoder.", "quant_conv.")}
DROPPED = {VAE_DECODER: ("encoder", "quant_conv"), VAE_ENCODER: ("decoder", "post_quant_conv")}  # the other half
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def hf_module(net: str, graph_module: nn.Module) -> nn.Module:
    """The Hugging Face module inside a pm_runtime.modeling.graphs wrapper (the VAE encoder's wrapper
    holds the AutoencoderKL's `encoder` and `quant_conv` under their own names, and its config)."""
    return {UNET: lambda m: m.unet, TEXT_ENCODER: lambda m: m.encoder.text_encoder, VAE_DECODER: lambda m: m.vae,
            VAE_ENCODER: lambda m: m, SAFETY_CHECKER: lambda m: m.checker}[net](graph_module)


def save_weights(net: str, graph_module: nn.Module, path: Path, precision: str = "fp16") -> dict:
    """Write `net`'s weights to `path` (safetensors); returns the component details."""
    from safetensors.torch import save_file

    module = hf_module(net, graph_module)
    keep = KEEP_PREFIXES.get(net)
    state = {k: v.detach().to(DTYPES[precision]).contiguous() for k, v in module.state_dict().items()
             if keep is None or k.startswith(keep)}
    save_file(state, str(path), metadata={"network": net, "class": CLASSES[net]})
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return {"class": CLASSES[net], "config": _jsonable(config), "tensors": len(state)}


def _jsonable(config: dict) -> dict:
    import json

    return json.loads(json.dumps(config, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _empty_module(net: str, class_name: str, config: dict, device: torch.device) -> nn.Module:
    """The module with its config. UNet and VAE are built on the meta device (no memory, no random
    init) and take the loaded tensors as they are; the text encoder, which has computed buffers
    (position ids), is built for real on the CPU (it is small)."""
    if net == TEXT_ENCODER:
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_dict(config))
    if net == SAFETY_CHECKER:  # a CLIP vision tower: computed buffers too
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig

        return StableDiffusionSafetyChecker(CLIPConfig.from_dict(config))
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return (UNet2DConditionModel if net == UNET else AutoencoderKL).from_config(config)


def load_graph_module(net: str, details: dict, path: Path, device: torch.device, dtype: torch.dtype,
                      standalone: bool = True) -> nn.Module:
    """The graph wrapper (pm_runtime.modeling.graphs) of `net`, built from a bundle's torch weights.

    standalone (default): the module is pm_runtime.modeling.standalone's (torch only: no diffusers
    or transformers import) wherever that supports the config; else the Hugging Face class. A
    standalone UNet comes back as FastUNet (its computation); the Hugging Face one as UNetGraph.
    """
    from safetensors.torch import load_file

    from . import standalone as torch_only
    from .graphs import SafetyCheckerGraph, TextEncoderGraph, UNetGraph, VaeDecoderGraph, VaeEncoderGraph

    class_name, config = details.get("class", "?"), details.get("config", {})
    if CLASSES.get(net) != class_name:
        raise UserError(f"bundle component for {net} names class {class_name!r}; expected {CLASSES.get(net)!r}")
    state = load_file(str(path), device=str(device))  # the shipped fp16 tensors, already where they will run
    state = {k: v.to(dtype) for k, v in state.items()}
    why = torch_only.unsupported(net, config) if standalone else "standalone modules turned off"
    if why is None:
        module = torch_only.build(net, state, config)
        if net == UNET:
            from .fast_unet import FastUNet

            return FastUNet(module).eval()
    else:
        module = _hf_module(net, class_name, config, state, path, device, dtype, why)
        if net == UNET:
            from .attention import install_split_kv

            install_split_kv(module)
            return UNetGraph(module).eval()
    if net == TEXT_ENCODER:
        return TextEncoderGraph(module).eval()
    if net == SAFETY_CHECKER:
        return SafetyCheckerGraph(module).eval()
    if net == VAE_ENCODER:
        return VaeEncoderGraph(module).eval()
    return VaeDecoderGraph(module).eval()


def _hf_module(net: str, class_name: str, config: dict, state: dict, path: Path, device, dtype, why: str) -> nn.Module:
    """The Hugging Face module of `net` holding `state` (`why`: why not the standalone one)."""
    import importlib.util

    from .loading import quiet_hf

    if any(importlib.util.find_spec(m) is None for m in ("diffusers", "transformers")):
        raise UserError(f"{net}: this network needs diffusers and transformers ({why}): "
                        "pip install 'personamagic-runtime[train]'")

    with quiet_hf():
        module = _empty_module(net, class_name, config, device)
    meta = next(module.parameters()).is_meta
    missing, unexpected = module.load_state_dict(state, strict=False, assign=meta)  # meta: take the tensors
    keep = KEEP_PREFIXES.get(net)
    missing = [k for k in missing if keep is None or k.startswith(keep)]
    if missing or unexpected:
        raise UserError(f"{path.name} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if keep is not None:  # drop the half that was not shipped (the VAE's other half)
        for name in DROPPED[net]:
            if hasattr(module, name):
                setattr(module, name, None)
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta:
        raise UserError(f"{path.name}: {len(still_meta)} tensors were not loaded (e.g. {still_meta[0]})")
    with quiet_hf():  # diffusers warns on any dtype cast through .to()
        return module.to(device=device, dtype=dtype).requires_grad_(False).eval()

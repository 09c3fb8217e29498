"""Export the three networks to ONNX with the signatures of pm_runtime.specs.

torch.onnx.export with the TorchScript exporter (dynamo=False): it handles diffusers' UNet with
dynamic batch and resolution. Each network is wrapped so its graph IO is exactly its spec:
  text_encoder  input_ids (N, L) int64, concept_embeds (N, L, D), bypass (N, L, D),
                concept_mask (N, L) bool -> c_k, c_v (N, L, D)
  unet          sample (N, 4, h, w), timestep (N,), c_k, c_v (N, L, D) -> noise_pred (N, 4, h, w)
  vae_decoder   latent (N, 4, h, w) -> image (N, 3, 8h, 8w) in [-1, 1]; the 1/scaling_factor
                division is INSIDE the graph: feed the scheduler's latent as it is.
Graphs whose weights exceed protobuf's 2 GB limit (or any graph, when forced) are saved with ONNX
external data: one `NAME.onnx.data` file beside `NAME.onnx`.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pm_runtime.modeling.attention import install_split_kv, join_contexts
from pm_runtime.modeling.loading import BaseModel
from pm_runtime.modeling.text_encoder import EquilibriumTextEncoder, clip_parts
from pm_runtime.specs import TEXT_ENCODER, UNET, VAE_DECODER, ModelDims, NetworkSpec

OPSET = 17
EXTERNAL_DATA_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB, less headroom for the graph itself


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.encoder = EquilibriumTextEncoder(text_encoder)

    def forward(self, input_ids, concept_embeds, bypass, concept_mask):
        # Placeholder ids may lie beyond the base vocabulary (they are added per concept): at masked
        # positions the embedding is replaced anyway, so look up id 0 there and never go out of range.
        ids = torch.where(concept_mask, torch.zeros_like(input_ids), input_ids)  # (N, L)
        return self.encoder(ids, concept_embeds, bypass, concept_mask)  # c_k, c_v (N, L, D)


class UNetGraph(nn.Module):
    """The UNet with split K/V cross-attention, taking c_k and c_v as two inputs."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, c_k, c_v):
        return self.unet(sample, timestep, join_contexts(c_k, c_v), return_dict=False)[0]  # (N, 4, h, w)


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latent):
        return self.vae.decode(latent * self.scale, return_dict=False)[0]  # (N, 3, 8h, 8w)


def model_dims(base: BaseModel) -> ModelDims:
    """Call before placeholder tokens are added: the vocabulary is the base model's."""
    text_cfg = base.text_encoder.config
    vocab = int(clip_parts(base.text_encoder)[0].token_embedding.weight.shape[0])
    return ModelDims(
        text_dim=int(text_cfg.hidden_size), max_length=int(text_cfg.max_position_embeddings), vocab_size=vocab,
        latent_channels=int(base.unet.config.in_channels),
        vae_scale_factor=2 ** (len(base.vae.config.block_out_channels) - 1))


def graph_modules(base: BaseModel) -> dict[str, nn.Module]:
    """The PyTorch modules that export and validation compare (fp32, eval, split K/V installed)."""
    install_split_kv(base.unet)
    return {TEXT_ENCODER: TextEncoderGraph(base.text_encoder).eval(), UNET: UNetGraph(base.unet).eval(),
            VAE_DECODER: VaeDecoderGraph(base.vae).eval()}


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: Path, external_data: str = "auto") -> list[Path]:
    """Save `model` to `path`; returns every file written (the graph, then any external data file).

    external_data: "auto" (only above protobuf's limit), "always" or "never".
    """
    path = Path(path)
    use_external = external_data == "always" or (external_data == "auto" and weight_bytes(model) > EXTERNAL_DATA_LIMIT)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if use_external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


@contextlib.contextmanager
def _quiet_export():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape-dependent Python branches in diffusers
        yield


def export_network(module: nn.Module, spec: NetworkSpec, path: Path, *, opset: int = OPSET,
                   external_data: str = "auto") -> list[Path]:
    """Trace `module` with the spec's opt-shape dummy inputs and write `path` (+ external data)."""
    rng = np.random.default_rng(1234)
    # Trace at the opt shapes (batch 2 / 24, 64x64 latent): no dynamic size is 1, so none is
    # specialised away by the tracer; validation then runs other shapes.
    dummy = spec.dummy_inputs(rng, "opt")
    args = tuple(torch.from_numpy(dummy[n]) for n in spec.input_names)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"  # large models: torch writes external data beside it
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(module, args, str(raw), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw))  # external data, if any, is read into memory here
    model.doc_string = spec.doc
    return save_onnx(model, path, external_data)

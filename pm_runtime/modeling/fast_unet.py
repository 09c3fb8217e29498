"""The SD UNet's forward for inference, rewritten around fused kernels (pm_kernels): what the
torch-cuda backend runs and captures in a CUDA graph.

Same weights, same function as UNetGraph (diffusers' UNet2DConditionModel with split K/V
cross-attention, DESIGN §1); what changes is how it is computed:
- channels-last activations end to end: a transformer's (N, C, H, W) -> (N, HW, C) reshape is
  then a free view, and cuDNN runs its NHWC convolutions without transposes;
- GroupNorm + SiLU in one kernel, with the ResNet's time-embedding add folded in
  (pm_kernels.group_norm_silu);
- fused epilogues (`fused_epilogues`, on by default): PyTorch adds a cuDNN convolution's bias in a
  pass of its own over the output, so the ResNet's convolutions run without bias: conv1's goes into
  the time-embedding vector that norm2 adds anyway (folded into time_emb_proj's bias), conv2's and
  the shortcut's into one kernel that also does the residual add (pm_kernels.add_bias_residual);
  in the transformer block each residual add and the LayerNorm after it are one kernel
  (pm_kernels.add_layer_norm), and the adds after the feed-forward and after proj_out are done by
  their GEMMs, accumulating in place into the residual stream (addmm_), whose biases it carries
  already: ff[2]'s added by add_layer_norm, proj_out's by the ResNet before the transformer (its
  GroupNorm takes it off again through the time-vector input); conv_in's and the down- and
  upsamplers' convolutions run without their biases too, left to the ResNets that read their
  outputs (input_shifts: norm1 adds the missing vector, the residual kernel its share);
- time tables: in the torch-cuda loop the timesteps of an image are known before its first step,
  so every ResNet's time-embedding vector of every step is computed ONCE per image into one table
  (set_timesteps) and a step reads its row by index (forward(..., t_index=...)): no sinusoid, time
  MLP or time projection inside the step;
- self-attention: one GEMM for Q, K and V (their weights concatenated once, the module's own
  to_q/to_k/to_v weights become views of it: no extra memory), attention read in place;
- cross-attention: K = to_k(C_k), V = to_v(C_v) (the split contexts), one fused attention kernel
  for the short key axis (pm_kernels.attention). In the torch-cuda loop the contexts of an image
  are known before the first step, so every cross-attention layer's K and V of every context
  are computed ONCE per image into tables (set_contexts) and the kernel reads the rows a step
  needs by index (forward(..., kv_index=...)): no K/V projection inside the step at all; or (the
  torch-cuda default, allocate_step_contexts) two-row buffers read the same way: the negative
  prompt's K/V once per image, the step's own context's by ONE GEMM for K and one for V over every
  layer's concatenated weights (views: no copy), 7.7 MB instead of a 3.84 MB row per context;
- GEGLU in one kernel (pm_kernels.geglu); or inside its projection's GEMM (pm_kernels.geglu_linear:
  the 8x-wide projection is never written), per shape as pm_kernels.tuning measured the two on the
  GPU (`geglu_gemm` None, the default; True / False force one).
Only SD 1.x/2.x-style UNets are accepted (`unsupported` says why not); anything else runs on
the plain module. Where a kernel cannot run (no CUDA, no Triton), pm_kernels falls back to its
PyTorch reference, so this module also runs on the CPU (that is how it is tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_convs import PackedConv2d
from .int8_weights import weight_of

DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
UP = ("CrossAttnUpBlock2D", "UpBlock2D")
# UNet config keys FastUNet computes only at these values (diffusers' defaults; an absent key is its default)
CONFIG = {"mid_block_type": "UNetMidBlock2DCrossAttn", "addition_embed_type": None, "class_embed_type": None,
          "time_cond_proj_dim": None, "encoder_hid_dim": None, "time_embedding_act_fn": None,
          "timestep_post_act": None, "conv_out_kernel": 3, "center_input_sample": False, "act_fn": "silu",
          "resnet_time_scale_shift": "default"}


def config_unsupported(cfg) -> str | None:
    """The config part of `unsupported` (a diffusers UNet config, or the dict a bundle stores)."""
    down, up = cfg.get("down_block_types", ()), cfg.get("up_block_types", ())
    if any(t not in DOWN for t in down) or any(t not in UP for t in up):
        return f"block types {down} / {up}"
    for key, value in CONFIG.items():
        if cfg.get(key, value) != value:
            return f"{key}={cfg.get(key)!r}"
    return None


def unsupported(unet) -> str | None:
    """None when FastUNet computes exactly what `unet` computes, else the first reason why not."""
    reason = config_unsupported(unet.config)
    if reason:
        return reason
    for m in unet.modules():
        name = type(m).__name__
        if name == "ResnetBlock2D" and (m.time_embedding_norm != "default" or m.output_scale_factor != 1.0
                                        or m.upsample is not None or m.downsample is not None or m.skip_time_act):
            return "a ResNet block with up/down sampling, scale-shift or a scaled output"
        if name == "BasicTransformerBlock" and (m.norm_type != "layer_norm" or m.only_cross_attention
                                                or m.pos_embed is not None or type(m.ff.net[0]).__name__ != "GEGLU"
                                                or m.attn2 is None):
            return "a transformer block other than SD's (layer norm, self + cross attention, GEGLU)"
        if name == "Attention" and (m.residual_connection or m.rescale_output_factor != 1.0 or m.norm_q is not None
                                    or m.norm_cross or m.spatial_norm is not None or m.group_norm is not None):
            return "an attention layer with extras (norms, residual, rescale)"
        if name == "Transformer2DModel" and not m.is_input_continuous:
            return "a non-continuous Transformer2DModel"
        if name in ("Downsample2D", "Upsample2D") and getattr(m, "conv", None) is None:
            return "a resampler without convolution"
        if name == "Upsample2D" and (not m.interpolate or m.use_conv_transpose):
            return "an upsampler other than nearest + conv"
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            return f"a convolution with padding_mode={m.padding_mode!r}"
    return None


def _matrix(layer) -> torch.Tensor:
    """The (C_out, C_in) weight of an nn.Linear or a 1x1 nn.Conv2d (SD 1.x's proj_in / proj_out),
    either of them int8 (pm_runtime.modeling.int8_weights) or not."""
    w = weight_of(layer)
    return w.view(w.shape[0], w.shape[1])


def _linear(x, layer) -> torch.Tensor:
    """x (..., C_in) through such a layer."""
    return F.linear(x, _matrix(layer), layer.bias)


def conv(layer, x, bias: bool = True):
    """layer(x) for an nn.Conv2d, an int8 one or a packed one (CPU: cpu_convs.PackedConv2d); bias=False:
    the same convolution without its bias."""
    if bias:
        return layer(x)
    if isinstance(layer, PackedConv2d):
        return layer(x, bias=False)
    return F.conv2d(x, weight_of(layer), None, layer.stride, layer.padding, layer.dilation, layer.groups)


def gn_silu(norm: nn.GroupNorm, x, silu: bool = True, temb=None, out=None):
    """SiLU(norm(x + temb)) (silu=False: without the SiLU; temb (N, C) or None) in one pass:
    pm_kernels.group_norm_silu (Triton on CUDA GPUs, its PyTorch reference elsewhere): one output tensor
    where GroupNorm then SiLU make two (the VAE decode's activation peak at full resolution,
    benchmarks/live_memory.py); out=x: none (in place, for an input nothing reads afterwards)."""
    import pm_kernels

    return pm_kernels.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, temb=temb, silu=silu,
                                      out=out)


def fused_resnet(r, x, temb, out_bias, in_shift=None):
    """A ResNet block with the fused epilogues (FastUNet's and the standalone VAE decoder's): its
    convolutions run without their biases, conv1's being in `temb` (what norm2 adds to its output,
    (N, C)) and conv2's and the shortcut's in `out_bias`, which one kernel adds with the residual,
    written into conv2's output. in_shift (N, C_in) or None: a per-channel bias the input still lacks
    (its convolution ran without it: FastUNet's conv_in and resamplers), which norm1 adds before
    normalising; `out_bias` then carries its residual share (input_shifts)."""
    import pm_kernels

    h = conv(r.conv1, gn_silu(r.norm1, x, temb=in_shift), bias=False)
    h = conv(r.conv2, gn_silu(r.norm2, h, temb=temb), bias=False)
    s = x if r.conv_shortcut is None else conv(r.conv_shortcut, x, bias=False)
    return pm_kernels.add_bias_residual(h, s, out_bias, out=h)


def fused_resnet_consuming(r, box: list, temb, out_bias, in_shift=None):
    """fused_resnet(r, box.pop(), temb, out_bias, in_shift) for a caller that keeps no other reference to the
    input (inference only: it is overwritten): the same kernels and values, with fewer full-size
    tensors alive at once. With a shortcut convolution, the shortcut runs first and norm1 then
    writes into the input (alive at conv1: input, shortcut, conv1's output, where fused_resnet
    holds the input, its normalised copy and conv1's output); norm2 always writes into conv1's
    output (alive at conv2: the residual, conv1's and conv2's outputs, one fewer). For the
    standalone VAE decoder: its 512 px fp16 activation peak 320 -> 256 MiB (benchmarks/live_memory.py)."""
    import pm_kernels

    x = box.pop()
    if r.conv_shortcut is not None:
        s = conv(r.conv_shortcut, x, bias=False)
        h = conv(r.conv1, gn_silu(r.norm1, x, temb=in_shift, out=x), bias=False)
    else:
        s = x  # the residual: read again at the end, so normalised into a new tensor
        h = conv(r.conv1, gn_silu(r.norm1, x, temb=in_shift), bias=False)
    del x
    h = conv(r.conv2, gn_silu(r.norm2, h, temb=temb, out=h), bias=False)
    return pm_kernels.add_bias_residual(h, s, out_bias, out=h)


def _sum(*tensors):
    """The sum of the tensors that are not None (None when all are)."""
    present = [t for t in tensors if t is not None]
    return None if not present else torch.stack([t.detach() for t in present]).sum(0)


def resnet_biases(r) -> tuple:
    """(time bias, out bias) of a ResNet block whose convolutions run without their biases (the fused
    epilogues): what norm2 adds to conv1's output besides the time projection (conv1's bias, plus
    time_emb_proj's where it has one), and what the residual kernel adds (conv2's and the
    shortcut's biases). Either is None where no bias exists."""
    proj = getattr(r, "time_emb_proj", None)
    return (_sum(r.conv1.bias, None if proj is None else proj.bias),
            _sum(r.conv2.bias, None if r.conv_shortcut is None else r.conv_shortcut.bias))


def input_shifts(u) -> dict:
    """{id(ResNet): the per-channel bias its input lacks, fp32 (C_in,), or None} when the UNet's
    conv_in and its down- and upsamplers' convolutions run without their biases (FastUNet's fused
    epilogues: PyTorch adds a cuDNN convolution's bias in a pass of its own). Their outputs only ever
    reach ResNets: directly (the next block's first), or as skip connections concatenated in the up
    path, where the missing vector is the concatenation's (zeros for a complete part). Follows the
    forward's skip stack."""
    def bias(layer):
        return None if layer.bias is None else layer.bias.detach().float()

    def width(layer):  # output channels of an nn.Conv2d or an int8 one
        return layer.out_channels

    shifts: dict = {}
    missing, channels = bias(u.conv_in), width(u.conv_in)
    skips = [(missing, channels)]
    for block in u.down_blocks:
        for r in block.resnets:
            shifts[id(r)] = missing
            missing, channels = None, width(r.conv2)  # a ResNet's (and its transformer's) output is complete
            skips.append((missing, channels))
        for d in block.downsamplers or ():
            missing, channels = bias(d.conv), width(d.conv)
            skips.append((missing, channels))
    for r in u.mid_block.resnets:
        shifts[id(r)] = missing
        missing = None
    for block in u.up_blocks:
        for r in block.resnets:
            skip, skip_channels = skips.pop()
            if missing is None and skip is None:
                shifts[id(r)] = None
            else:
                c_in = r.norm1.weight.shape[0]

                def zeros(count, w=r.norm1.weight):  # a complete part of the concatenation
                    return w.new_zeros(count, dtype=torch.float32)
                shifts[id(r)] = torch.cat([missing if missing is not None else zeros(c_in - skip_channels),
                                           skip if skip is not None else zeros(skip_channels)])
            missing = None
        for up in block.upsamplers or ():
            missing = bias(up.conv)
    return shifts


def _fold_input_shift(r, shift) -> None:
    """Register ResNet r's input shift (pm_in_shift, norm1's per-channel add; None where its input is
    complete) and add its residual share to pm_out_bias: the shift itself through an identity
    residual, the shortcut convolution's image of it (W_sc @ shift) through a 1x1 shortcut."""
    if shift is None:
        r.register_buffer("pm_in_shift", None, persistent=False)
        return
    ref = r.norm1.weight
    shift = shift.to(ref.device)
    if r.conv_shortcut is None:
        share = shift
    else:
        w = weight_of(r.conv_shortcut).detach().float()
        share = w.reshape(w.shape[0], w.shape[1]) @ shift
    out = share if r.pm_out_bias is None else r.pm_out_bias.float() + share
    r.register_buffer("pm_out_bias", out.to(ref.dtype), persistent=False)  # (the run dtype: norm1 is never int8)
    r.register_buffer("pm_in_shift", shift.to(ref.dtype), persistent=False)


def _one_matrix(layers) -> tuple:
    """(weights, bias) of linear `layers` as one layer: their weights concatenated along the output
    axis, each layer's own weight made a view of its rows (same values, no second copy), so one GEMM
    computes all of them; the biases concatenated likewise (zeros for a layer without; None where no
    layer has one)."""
    w = torch.cat([layer.weight for layer in layers]).detach()
    off = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(w[off:off + rows], requires_grad=False)
        off += rows
    b = None
    if any(layer.bias is not None for layer in layers):
        b = torch.cat([layer.bias if layer.bias is not None else w.new_zeros(layer.weight.shape[0])
                       for layer in layers]).detach()
    return w, b


def _fuse_qkv(attn) -> None:
    """Q, K and V of a self-attention from one GEMM: concatenate the weights once and make the
    module's own weights views of the result (same values, no second copy)."""
    if hasattr(attn, "pm_qkv_int8"):
        return  # int8 weights: Q, K and V exist only fused (int8_weights.quantize_unet_)
    if hasattr(attn, "pm_qkv") and attn.to_q.weight.data_ptr() == attn.pm_qkv.data_ptr():
        return  # already fused (a module moved with .to() is fused again: its views became copies)
    qkv, bias = _one_matrix((attn.to_q, attn.to_k, attn.to_v))  # (3 inner, C)
    attn.register_buffer("pm_qkv", qkv, persistent=False)
    attn.register_buffer("pm_qkv_bias", bias, persistent=False)


class FastUNet(nn.Module):
    """forward(sample (N, 4, h, w), timestep (N,), c_k, c_v (N, L, D)) -> noise_pred (N, 4, h, w),
    the signature of UNetGraph. Wraps (does not copy) a diffusers UNet or the parameter tree of
    pm_runtime.modeling.standalone.UNet; call after moving the UNet to its device, dtype and memory format."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        reason = unsupported(unet)
        if reason:
            raise ValueError(f"FastUNet does not support this UNet: {reason}")
        import pm_kernels

        self.k = pm_kernels
        self.unet = unet.eval()
        self.self_attn, self.cross = [], []  # every self- / cross-attention layer, in forward order
        for m in unet.modules():  # transformer blocks: diffusers' BasicTransformerBlock or standalone.TransformerBlock
            if getattr(m, "attn1", None) is not None and getattr(m, "attn2", None) is not None:
                _fuse_qkv(m.attn1)
                self.self_attn.append(m.attn1)
                self.cross.append(m.attn2)
        self.kv_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(attn2) -> (K, V) tables
        self.step_kv_buffers: tuple | None = None  # the two-row K and V buffers (allocate_step_contexts)
        u = unet
        self.resnets = [r for b in (*u.down_blocks, u.mid_block, *u.up_blocks) for r in b.resnets]  # forward order
        self.register_biases()
        # conv biases folded into the time vector / one residual kernel, add + LayerNorm fused, residual
        # adds after the feed-forward and proj_out accumulated by their GEMMs
        self.fused_epilogues = True
        self.time_table: torch.Tensor | None = None  # (rows, sum of the ResNets' widths), see set_timesteps
        self.time_slots: list[tuple[int, int]] = []  # per ResNet: (offset, width) in a time-table row
        # feed-forward in chunks of this many tokens where a block has more (None: in one piece):
        # less activation memory at large images, same values (torch-cuda sets it in low-memory mode)
        self.ff_chunk: int | None = None
        # the feed-forward's GEGLU inside its projection's GEMM (pm_kernels.geglu_linear, a Triton GEMM:
        # True) or cuBLAS's projection + the GEGLU kernel (False); None: per shape, pm_kernels.tuning's
        # choice where it made one on this GPU (pm_kernels.geglu_projection), else the latter
        self.geglu_gemm: bool | None = None

    def register_biases(self) -> None:
        """The biases the fused epilogues add, as module buffers of the UNet's blocks (they move with
        it), from the weights in use now (quantize_unet_ calls this again once the layers are int8:
        a 1x1 shortcut's share of an input shift is its weight's image of it)."""
        u = self.unet
        shifts = input_shifts(u)  # conv_in's and the resamplers' biases, left to the ResNets that read them
        for r in self.resnets:
            time_bias, out_bias = resnet_biases(r)
            r.register_buffer("pm_time_bias", time_bias, persistent=False)
            r.register_buffer("pm_out_bias", out_bias, persistent=False)
            _fold_input_shift(r, shifts[id(r)])
        # A transformer follows a ResNet in every SD block that has one. With the fused epilogues the
        # ResNet's residual kernel also adds the transformer's proj_out bias (the transformer's input x
        # carries it), the transformer's GroupNorm takes it off again (as its time-vector input) and
        # proj_out accumulates into x in place: one GEMM for "x + proj_out(h)", no add kernel.
        self.before_transformer: set[int] = set()  # ids of those ResNets
        for block in (*u.down_blocks, u.mid_block, *u.up_blocks):
            for r, t in zip(block.resnets, getattr(block, "attentions", None) or ()):
                pb = t.proj_out.bias
                r.register_buffer("pm_out_bias_t", _sum(r.pm_out_bias, pb), persistent=False)
                t.register_buffer("pm_in_shift", None if pb is None else -pb.detach(), persistent=False)
                self.before_transformer.add(id(r))

    # ------------------------------------------------------------------ per-image K/V tables
    def allocate_context_tables(self, rows: int, length: int, empty: bool = False) -> None:
        """Static (rows, L, inner) K and V tables for every cross-attention layer (allocate before
        a CUDA graph is captured: the graph reads them in place), views of ONE buffer (a single
        block: once freed, the allocator can hand it out whole or split; empty=True: not zeroed)."""
        self.kv_tables, self.step_kv_buffers = {}, None
        w = self.unet.conv_in.weight  # the run dtype and device (conv_in is never int8)
        sizes = [rows * length * attn.to_k.out_features for attn in self.cross]
        flat = (torch.empty if empty else torch.zeros)(2 * sum(sizes), dtype=w.dtype, device=w.device)
        offset = 0
        for attn, size in zip(self.cross, sizes):
            shape = (rows, length, attn.to_k.out_features)
            k, v = (flat[offset + j * size: offset + (j + 1) * size].view(shape) for j in (0, 1))
            self.kv_tables[id(attn)] = (k, v)
            offset += 2 * size

    def drop_context_tables(self) -> None:
        """Forget the tables (a CUDA graph that was captured reading them keeps their addresses)."""
        self.kv_tables = {}
        self.step_kv_buffers = None

    def set_contexts(self, c_k, c_v) -> None:
        """Fill the tables' first rows from the contexts (rows, L, D): K = to_k(C_k), V = to_v(C_v)."""
        for attn in self.cross:
            k_tab, v_tab = self.kv_tables[id(attn)]
            k_tab[:len(c_k)].copy_(attn.to_k(c_k.to(k_tab.dtype)))
            v_tab[:len(c_v)].copy_(attn.to_v(c_v.to(v_tab.dtype)))

    # ------------------------------------------------------------------ per-step K/V (two rows)
    def step_contexts_supported(self) -> bool:
        """Whether every cross-attention's to_k and to_v is a plain linear layer (not int8): the
        per-step K/V GEMMs read their weights concatenated (allocate_step_contexts)."""
        return bool(self.cross) and all(type(getattr(a, n)) is nn.Linear for a in self.cross for n in ("to_k", "to_v"))

    def _fuse_cross_kv(self) -> tuple:
        """((K weights, K bias), (V weights, V bias)): every cross-attention's to_k weights concatenated
        into one (sum of inners, D) matrix, its to_v's into another, the layers' own weights made views
        of them (same values, no second copy; a module moved with .to() is fused again: its views
        became copies). Biases likewise (None where no layer has one: SD's have none)."""
        fused = []
        for name in ("to_k", "to_v"):
            layers = [getattr(a, name) for a in self.cross]
            w, b = getattr(self, f"pm_{name}_all", None), getattr(self, f"pm_{name}_all_bias", None)
            if w is None or any(lay.weight.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
                                for lay in layers):
                w, b = _one_matrix(layers)
                self.register_buffer(f"pm_{name}_all", w, persistent=False)
                self.register_buffer(f"pm_{name}_all_bias", b, persistent=False)
            fused.append((w, b))
        return tuple(fused)

    def allocate_step_contexts(self, length: int) -> None:
        """Two-row K and V "tables" for every cross-attention layer, read like the per-image ones
        (forward's kv_index): row 0 the negative prompt's (set_step_contexts once per image), row 1 the
        step's own context (set_step_contexts inside the step). Each layer's are views (2, L, inner)
        of one (2, L, sum of inners) buffer for K and one for V, so a single GEMM over every layer's
        concatenated weights fills a row of all of them: 2 GEMMs per step, and 2 rows (7.7 MB in fp16
        at SD 1.5 widths) instead of a row per context (>= 32 rows: >= 123 MB). Allocate before a
        CUDA graph is captured (it reads them in place)."""
        self.kv_weights = self._fuse_cross_kv()
        w = self.unet.conv_in.weight
        total = self.kv_weights[0][0].shape[0]
        self.step_kv_buffers = tuple(torch.zeros((2, length, total), dtype=w.dtype, device=w.device) for _ in range(2))
        self.kv_tables = {}
        off = 0
        for attn in self.cross:
            inner = attn.to_k.weight.shape[0]
            self.kv_tables[id(attn)] = tuple(buf[:, :, off:off + inner] for buf in self.step_kv_buffers)
            off += inner

    def set_step_contexts(self, c_k, c_v, row: int) -> None:
        """Row `row` of the two-row K/V buffers from one context each (1, L, D): K = to_k(C_k) and
        V = to_v(C_v) of every layer at once, one GEMM each, written in place."""
        for buf, (w, b), c in zip(self.step_kv_buffers, self.kv_weights, (c_k, c_v)):
            c2 = c.reshape(-1, c.shape[-1])
            if c2.dtype != buf.dtype:  # (the step's context buffers are in the run dtype already)
                c2 = c2.to(buf.dtype)
            if b is None:
                torch.mm(c2, w.t(), out=buf[row])
            else:
                torch.addmm(b, c2, w.t(), out=buf[row])

    # ------------------------------------------------------------------ per-image time tables
    def allocate_time_tables(self, rows: int) -> None:
        """A static (rows, sum of the ResNets' widths) table of time-embedding vectors (allocate before
        a CUDA graph is captured: the graph reads it in place)."""
        w = self.unet.conv_in.weight
        widths = [r.norm2.weight.shape[0] for r in self.resnets]
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        self.time_slots = list(zip(offsets, widths))
        self.time_table = torch.zeros((rows, sum(widths)), dtype=w.dtype, device=w.device)

    def set_timesteps(self, timesteps) -> None:
        """Fill the table's first rows with every ResNet's time vector at these timesteps (S,)."""
        vectors = self._time_vectors(timesteps.reshape(-1))
        for (off, width), v in zip(self.time_slots, vectors):
            self.time_table[:len(timesteps), off:off + width].copy_(v)

    def _time_vectors(self, t) -> list:
        """Per ResNet, what its norm2 adds to conv1's output at timesteps t (N,): time_emb_proj(
        SiLU(temb)) (N, C), plus conv1's bias where the epilogues are fused (conv1 then runs without)."""
        u = self.unet
        dtype = u.conv_in.weight.dtype
        temb_act = F.silu(u.time_embedding(u.time_proj(t).to(dtype)))  # every ResNet reads SiLU(temb)
        out = []
        for r in self.resnets:
            if not self.fused_epilogues:
                out.append(r.time_emb_proj(temb_act))
            elif r.time_emb_proj is not None:
                out.append(F.linear(temb_act, weight_of(r.time_emb_proj), r.pm_time_bias))
            else:
                out.append(None if r.pm_time_bias is None else r.pm_time_bias.expand(len(t), -1))
        return out

    # ------------------------------------------------------------------ pieces
    def _resnet(self, r, x, temb):
        """x: the block's input; or a list holding it that the block pops (the caller keeps no other
        reference: with the fused epilogues and no autograd the input is overwritten or freed early,
        fused_resnet_consuming)."""
        if self.fused_epilogues:  # (+ the next transformer's proj_out bias, see __init__)
            bias = r.pm_out_bias_t if id(r) in self.before_transformer else r.pm_out_bias
            shift = r.pm_in_shift
            if shift is not None:  # the input's convolution ran without its bias (input_shifts)
                shift = shift.expand((x[0] if isinstance(x, list) else x).shape[0], -1)
            if isinstance(x, list) and not torch.is_grad_enabled():
                return fused_resnet_consuming(r, x, temb, bias, shift)
            return fused_resnet(r, x.pop() if isinstance(x, list) else x, temb, bias, shift)
        if isinstance(x, list):
            x = x.pop()
        h = r.conv1(gn_silu(r.norm1, x))
        h = r.conv2(gn_silu(r.norm2, h, temb=temb))  # norm2(h + temb) + SiLU, fused
        if r.conv_shortcut is not None:
            x = r.conv_shortcut(x)
        return x + h

    def _attention(self, attn, x, ctx=None):
        """x (N, S, C) -> attn(x) (N, S, C). Self-attention when ctx is None; cross-attention with
        ctx = (c_k, c_v) contexts, or ctx = kv_index (N,) into the layer's K/V tables. x may be a
        list holding it, popped here (the caller keeps no other reference): x is then freed once
        projected, and Q/K/V once attended, before the output projection."""
        if isinstance(x, list):
            x = x.pop()
        index = None
        if ctx is None:
            qkv = (attn.pm_qkv_int8(x) if hasattr(attn, "pm_qkv_int8")
                   else F.linear(x, attn.pm_qkv, attn.pm_qkv_bias))  # (N, S, 3 inner)
            inner = qkv.shape[-1] // 3
            q, k, v = qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., 2 * inner:]
            del qkv  # its memory lives on in the views q, k, v
        elif isinstance(ctx, tuple):
            q, k, v = attn.to_q(x), attn.to_k(ctx[0]), attn.to_v(ctx[1])  # (N, S, inner), (N, L, inner) x 2
        else:
            (k, v), index = self.kv_tables[id(attn)], ctx  # (rows, L, inner) tables, read by row
            q = attn.to_q(x)
        del x
        out = self.k.attention(q, k, v, attn.heads, attn.scale, kv_index=index)  # (N, S, inner)
        del q, k, v  # (and a self-attention's fused Q/K/V with them)
        return attn.to_out[0](out)

    def _add_norm(self, a, h, norm, s_bias=None):
        """(a + h, norm(a + h)): the residual add and the LayerNorm after it; fused, the returned
        stream also carries s_bias (which the norm does not see)."""
        if self.fused_epilogues:
            return self.k.add_layer_norm(a, h, norm.weight, norm.bias, norm.eps, s_bias=s_bias)
        h = a + h
        return h, norm(h)

    def _block(self, b, h, ctx):
        fused = self.fused_epilogues
        ff = b.ff.net
        # the attentions' inputs handed over in lists they pop (freed once projected, see _attention)
        h, x = self._add_norm(self._attention(b.attn1, [b.norm1(h)]), h, b.norm2)
        box = [x]
        del x
        # fused: h then carries ff[2]'s bias, and the feed-forward's output GEMM accumulates into it
        h, x = self._add_norm(self._attention(b.attn2, box, ctx), h, b.norm3, s_bias=ff[2].bias)
        chunk = self.ff_chunk
        if not chunk or h.shape[1] <= chunk:  # each temporary dropped as soon as it is read
            box = [x]
            del x
            a = self._geglu(ff[0].proj, box)
            if fused:  # h + a @ W^T (+ the bias h carries): one GEMM into h
                return h.view(-1, h.shape[-1]).addmm_(a.view(-1, a.shape[-1]), weight_of(ff[2]).t()).view(h.shape)
            return ff[2](a).add_(h)
        # token chunks: the 8x-wide GEGLU projection (80 MiB per sample at 1024 px in fp16) lives
        # one chunk at a time; each chunk's result goes straight into the output
        if fused:  # into h, which carries ff[2]'s bias
            w = weight_of(ff[2])
            for s in range(0, x.shape[1], chunk):
                h[:, s:s + chunk] += F.linear(self._geglu(ff[0].proj, [x[:, s:s + chunk]]), w)
            return h
        out = torch.empty_like(h)
        for s in range(0, x.shape[1], chunk):
            out[:, s:s + chunk] = ff[2](self._geglu(ff[0].proj, [x[:, s:s + chunk]]))
        return out.add_(h)

    def _geglu(self, proj, box: list):
        """GEGLU(proj(x)), x popped from `box` (freed once projected, as _attention's inputs): the
        projection then pm_kernels.geglu, or with geglu_gemm one GEMM with the GEGLU in its epilogue
        (pm_kernels.geglu_linear: the 8x-wide projection never in memory); geglu_gemm None on the
        kernels' Triton path: whichever of the two pm_kernels.tuning chose for the shape."""
        if self.geglu_gemm:
            return self.k.geglu_linear(box.pop(), _matrix(proj), proj.bias)
        if self.geglu_gemm is None and self.k.kernel_path("geglu", box[0]) == "triton":
            return self.k.geglu_projection(box.pop(), _matrix(proj), proj.bias)
        return self.k.geglu(proj(box.pop()))

    def _transformer(self, t, x, ctx):
        n, c, height, width = x.shape
        fused = self.fused_epilogues
        shift = t.pm_in_shift if fused else None  # fused: x carries proj_out's bias (_resnet), taken off here
        h = gn_silu(t.norm, x, silu=False, temb=None if shift is None else shift[None].expand(n, -1))
        h = h.permute(0, 2, 3, 1).reshape(n, height * width, c)  # a view for channels-last x
        h = _linear(h, t.proj_in)
        for b in t.transformer_blocks:
            h = self._block(b, h, ctx)
        if fused:  # x + proj_out(h), the bias already in x: one GEMM accumulating into x (in place where
            # x is channels-last: x is read by nothing else afterwards)
            x2 = x.permute(0, 2, 3, 1).reshape(n * height * width, c)
            x2 = x2.addmm_(h.reshape(-1, h.shape[-1]), _matrix(t.proj_out).t())
            return x2.view(n, height, width, c).permute(0, 3, 1, 2)
        h = _linear(h, t.proj_out)
        return h.view(n, height, width, -1).permute(0, 3, 1, 2) + x  # channels-last (N, C, H, W)

    # ------------------------------------------------------------------ forward
    def sample_format(self, device) -> torch.memory_format:
        """The layout forward computes in (channels-last when the weights are, as the torch-cuda backend
        keeps them on every device): a sample handed over in it is not converted."""
        channels_last = self.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, sample, timestep, c_k=None, c_v=None, kv_index=None, t_index=None):
        """c_k, c_v (N, L, D) contexts; or kv_index (N,) int64 rows of the tables of set_contexts.
        t_index (1,) int64: every sample is at the timesteps' row t_index of the time table
        (set_timesteps; `timestep` is then not read)."""
        u = self.unet
        dtype = u.conv_in.weight.dtype
        fmt = self.sample_format(sample.device)
        n = sample.shape[0]
        if t_index is not None:  # one row of the table: (1, sum of widths), each ResNet's slice expanded to n
            row = self.time_table.index_select(0, t_index.reshape(1))
            tembs = [row[:, off:off + width].expand(n, width) for off, width in self.time_slots]
        else:
            tembs = self._time_vectors(timestep.reshape(-1).expand(n))
        temb = dict(zip(map(id, self.resnets), tembs))
        ctx = kv_index if kv_index is not None else (c_k.to(dtype), c_v.to(dtype))
        fused = self.fused_epilogues  # conv_in's and the resamplers' biases then left to the ResNets after them
        h = conv(u.conv_in, sample.to(dtype).contiguous(memory_format=fmt), bias=not fused)
        skips = [h]
        for block in u.down_blocks:
            attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for r, a in zip(block.resnets, attns):
                h = self._resnet(r, h, temb[id(r)])
                if a is not None:
                    h = self._transformer(a, h, ctx)
                skips.append(h)
            for d in block.downsamplers or ():
                h = conv(d.conv, h, bias=not fused)
                skips.append(h)
        # from here on every block's input is read by that block only: handed over in a list it pops
        # (_resnet), the upsampler's input freed once upsampled; the down path's are also skips
        mid = u.mid_block
        h = self._resnet(mid.resnets[0], h, temb[id(mid.resnets[0])])  # h is also the last skip
        for a, r in zip(mid.attentions, mid.resnets[1:]):
            box = [self._transformer(a, h, ctx)]
            del h
            h = self._resnet(r, box, temb[id(r)])
        for block in u.up_blocks:
            attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for r, a in zip(block.resnets, attns):
                box = [torch.cat([h, skips.pop()], dim=1)]
                del h
                h = self._resnet(r, box, temb[id(r)])
                if a is not None:
                    h = self._transformer(a, h, ctx)
            for up in block.upsamplers or ():
                h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
                h = conv(up.conv, h, bias=not fused)
        h = u.conv_out(gn_silu(u.conv_norm_out, h, out=None if torch.is_grad_enabled() else h))
        return h  # (N, 4, h, w) in the UNet's dtype

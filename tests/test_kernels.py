"""pm_kernels against their PyTorch references at odd shapes, in fp32, fp16 and bf16.

Without a GPU the Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1);
every test asserts that the Triton path was taken, so a reference is never tested against
itself. The interpreter runs fp16 and bf16 on the CPU (bf16 tl.dot only after an upcast, which
attention does there: triton-lang/triton#11584). The `gpu` tests run the compiled kernels at
SD 1.5's shapes.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import importlib  # noqa: E402

import pm_kernels as K  # noqa: E402
from conftest import slow_unless  # noqa: E402

KA = importlib.import_module("pm_kernels.attention")  # the module (pm_kernels.attention is the function)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # max abs err / max |ref|
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


@pytest.fixture(autouse=True)
def kernels_on():
    K.set_enabled(True)
    yield
    K.set_enabled(True)


GN_IMPLS = ["tiled", "grouped", "grouped-split"]


@pytest.fixture
def gn_impl(request, monkeypatch):
    """GroupNorm's two Triton implementations; "grouped-split" forces the grouped one's two-launch
    path (statistics of pixel ranges, then their combination) at these small sizes."""
    gn = importlib.import_module("pm_kernels.group_norm")
    name = request.param
    splits = []  # grid of each range-statistics launch (the two-launch path)
    if name == "grouped-split":
        monkeypatch.setattr(gn, "FUSE_MAX", 0)
        monkeypatch.setattr(gn, "GROUPED_TILE", 128)  # tiles of 16-32 pixels: 2-5 ranges per group here
        stats = gn._gn_grp_stats
        monkeypatch.setattr(gn, "_gn_grp_stats", _Launch(lambda *a, **k: None, stats, splits))
    monkeypatch.setattr(gn, "_IMPL", name.split("-")[0])
    yield name
    if name == "grouped-split" and request.node.funcargs.get("h", 2) * request.node.funcargs.get("w", 2) > 1:
        assert splits and all(grid[1] > 1 for grid in splits), splits


GN_SHAPES = [(2, 40, 5, 7, 8), (1, 60, 1, 1, 4), (3, 32, 8, 8, 8)]  # (n, c, h, w, groups)
FORMATS = [torch.channels_last, torch.contiguous_format]


def case_id(value):
    names = {torch.channels_last: "cl", torch.contiguous_format: "nchw"}
    return names.get(value) or (str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None)


def gn_latin(n, c, h, w, groups, fmt, dtype, impl):
    """The default run's part of the grid: each shape x layout x implementation in one dtype, chosen
    (a Latin square) so that every dtype meets every shape, every layout and every implementation."""
    turn = GN_SHAPES.index((n, c, h, w, groups)) + FORMATS.index(fmt) + GN_IMPLS.index(impl)
    return DTYPES.index(dtype) == turn % len(DTYPES)


# -m slow: the other dtypes of each shape x layout x implementation
@pytest.mark.parametrize("n, c, h, w, groups, fmt, dtype, gn_impl", slow_unless(
    [(*shape, fmt, dtype, impl) for shape in GN_SHAPES for fmt in FORMATS for dtype in DTYPES for impl in GN_IMPLS],
    gn_latin), indirect=["gn_impl"], ids=case_id)
def test_group_norm_silu(n, c, h, w, groups, fmt, dtype, gn_impl):
    g = torch.Generator().manual_seed(n + c + h)
    x = (3 + torch.randn(n, c, h, w, generator=g)).to(DEVICE, dtype).contiguous(memory_format=fmt)  # mean >> 0
    weight, bias = torch.randn(2, c, generator=g).to(DEVICE)
    temb = torch.randn(n, c, generator=g).to(DEVICE, dtype)
    assert K.kernel_path("group_norm_silu", x) == "triton"
    for t, silu in ((None, True), (temb, False)):  # each flag both ways (independent branches of the kernels)
        out = K.group_norm_silu(x, weight, bias, groups, 1e-5, temb=t, silu=silu)
        ref = K.group_norm_silu_reference(x, weight, bias, groups, 1e-5, temb=t, silu=silu)
        assert out.shape == x.shape and out.dtype == dtype
        assert out.is_contiguous(memory_format=fmt) or h * w == 1
        assert rel_err(out, ref) <= TOL[dtype]


# every implementation x layout is test_group_norm_silu's; here each implementation in one layout, the other
# one in test_group_norm_large_mean (-m slow: the rest)
@pytest.mark.parametrize("fmt, gn_impl", slow_unless(
    [(fmt, impl) for fmt in FORMATS for impl in GN_IMPLS],
    lambda fmt, impl: FORMATS.index(fmt) == GN_IMPLS.index(impl) % 2), indirect=["gn_impl"], ids=case_id)
def test_group_norm_silu_out(fmt, gn_impl):
    """out=: in place (x itself: what the VAE decoder does with a dead input), into a tensor of the
    other memory format, into a non-dense view; each the values of the plain call, and the tensor
    given is the one returned."""
    g = torch.Generator().manual_seed(7)
    n, c, h, w, groups = 2, 24, 6, 5, 4
    x0 = (2 + torch.randn(n, c, h, w, generator=g)).to(DEVICE).contiguous(memory_format=fmt)
    weight, bias = torch.randn(2, c, generator=g).to(DEVICE)
    temb = torch.randn(n, c, generator=g).to(DEVICE)
    assert K.kernel_path("group_norm_silu", x0) == "triton"
    for t in (None, temb):
        ref = K.group_norm_silu_reference(x0, weight, bias, groups, 1e-5, temb=t)
        x = x0.clone()
        assert K.group_norm_silu(x, weight, bias, groups, 1e-5, temb=t, out=x) is x
        assert rel_err(x, ref) <= 1e-4 and x.is_contiguous(memory_format=fmt)
        other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
        y = torch.empty_like(x0, memory_format=other)
        assert K.group_norm_silu(x0, weight, bias, groups, 1e-5, temb=t, out=y) is y
        assert rel_err(y, ref) <= 1e-4 and y.is_contiguous(memory_format=other)
        big = torch.zeros(n, c, h, 2 * w, device=DEVICE)
        view = big[..., ::2]  # dense in neither layout
        assert K.group_norm_silu(x0, weight, bias, groups, 1e-5, temb=t, out=view) is view
        assert rel_err(view, ref) <= 1e-4 and not big[..., 1::2].any()
    with pytest.raises(ValueError, match="out"):
        K.group_norm_silu(x0, weight, bias, groups, 1e-5, out=x0[:1])


@pytest.mark.parametrize("fmt, gn_impl", slow_unless(
    [(fmt, impl) for fmt in FORMATS for impl in GN_IMPLS],
    lambda fmt, impl: FORMATS.index(fmt) != GN_IMPLS.index(impl) % 2), indirect=["gn_impl"], ids=case_id)
def test_group_norm_large_mean(fmt, gn_impl):
    """mean 300 >> std 1: a plain fp32 sum / sum-of-squares variance loses ~1e-2 here (PyTorch's
    own CPU channels-last GroupNorm does); pivoted sums keep fp32 accuracy. Against float64."""
    g = torch.Generator().manual_seed(1)
    x = 300 + torch.randn(2, 64, 12, 12, generator=g, dtype=torch.float64)
    w, b, t = torch.randn(3, 64, generator=g, dtype=torch.float64)  # weight, bias (64,); temb (2, 64)
    t = t.expand(2, 64) * torch.tensor([[1.0], [-0.5]], dtype=torch.float64)
    ref = torch.nn.functional.group_norm(x + t[:, :, None, None], 16, w, b, 1e-5)  # float64
    out = K.group_norm_silu(x.float().to(DEVICE).contiguous(memory_format=fmt), w.float().to(DEVICE),
                            b.float().to(DEVICE), 16, 1e-5, temb=t.float().to(DEVICE), silu=False)
    assert rel_err(out.cpu(), ref.float()) <= 1e-4


def test_group_norm_implementation_setting():
    gn = importlib.import_module("pm_kernels.group_norm")
    assert K.group_norm_impl() in gn.IMPLS
    with pytest.raises(ValueError, match="tiled, grouped, auto"):
        K.set_group_norm_impl("fast")
    before = K.group_norm_impl()
    with K.group_norm_impl_kept("auto"):
        assert K.group_norm_impl() == "auto"
    with pytest.raises(RuntimeError), K.group_norm_impl_kept():
        K.set_group_norm_impl("grouped")  # what a backend's gn_impl does inside the block
        raise RuntimeError
    assert K.group_norm_impl() == before


def test_generic_sizes_switch_launches_the_unspecialised_kernels(monkeypatch):
    """set_generic_sizes(True) (the GPU benchmark's A/B of the size rule) launches each size-taking
    kernel's unspecialised compile (its own JITFunction), with the same values; the block puts the
    setting back."""
    gn = importlib.import_module("pm_kernels.group_norm")
    res = importlib.import_module("pm_kernels.residual")
    launched = {"specialised": [], "generic": []}
    for kernel in (gn._gn_apply, res._add_bias_residual):
        for way in launched:
            monkeypatch.setattr(kernel, way, _Launch(None, getattr(kernel, way), launched[way]))
    x = torch.randn(2, 40, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    ref = K.add_bias_residual(K.group_norm_silu(x, w, b, 8, 1e-5), x, b)
    assert not K.generic_sizes() and len(launched["specialised"]) == 2 and not launched["generic"]
    with K.generic_sizes_kept(True):
        assert K.generic_sizes()
        out = K.add_bias_residual(K.group_norm_silu(x, w, b, 8, 1e-5), x, b)
    assert not K.generic_sizes() and len(launched["generic"]) == 2 and len(launched["specialised"]) == 2
    assert torch.equal(out, ref)


def test_group_norm_auto_takes_grouped_where_one_launch_covers_a_group(monkeypatch):
    gn = importlib.import_module("pm_kernels.group_norm")
    grouped = []
    real = gn._grouped
    monkeypatch.setattr(gn, "_grouped", lambda *a, **k: grouped.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(gn, "_IMPL", "auto")
    monkeypatch.setattr(gn, "FUSE_MAX", 4 * 9)  # 4 channels per group x 3 x 3 pixels
    w, b = torch.randn(2, 8, device=DEVICE)
    for side in (3, 4):
        x = torch.randn(1, 8, side, side, device=DEVICE)
        out = K.group_norm_silu(x, w, b, 2, 1e-5)
        assert rel_err(out, K.group_norm_silu_reference(x, w, b, 2, 1e-5)) <= 1e-4
    assert grouped == [(1, 8, 3, 3)]  # 4 x 16 pixels > FUSE_MAX: the tiled passes


@pytest.mark.parametrize("impl", ["tiled", "grouped", "auto"])
def test_group_norm_launch_count(impl, monkeypatch):
    """group_norm.launches() says how many kernels a call launches: counted here by the launches."""
    gn = importlib.import_module("pm_kernels.group_norm")
    monkeypatch.setattr(gn, "_IMPL", impl)
    monkeypatch.setattr(gn, "FUSE_MAX", 4 * 9)
    monkeypatch.setattr(gn, "GROUPED_TILE", 16)  # 4 pixels per tile at 4 channels per group
    grids = []
    for name in ("_gn_partial", "_gn_finalize", "_gn_apply", "_gn_grp_stats", "_gn_grp_apply"):
        monkeypatch.setattr(gn, name, _Launch(None, getattr(gn, name), grids))
    w, b = torch.randn(2, 8, device=DEVICE)
    for side in (3, 4):  # 36 elements per group (one grouped launch) and 64 (two, or tiled's three)
        grids.clear()
        K.group_norm_silu(torch.randn(1, 8, side, side, device=DEVICE), w, b, 2, 1e-5)
        assert len(grids) == gn.launches((1, 8, side, side), 2) == {"tiled": 3}.get(impl, 1 if side == 3 else
                                                                                     2 if impl == "grouped" else 3)


@pytest.mark.parametrize("mean", [0.0, 300.0])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_group_norm_bfloat16_on_the_cpu_without_triton(fmt, mean, monkeypatch):
    """The CPU's bfloat16 path without Triton (torch-cuda on a CPU): PyTorch's own GroupNorm in x's
    layout, no fp32 copy of x (the reference's), as close to the exact result as the reference is
    (float64 of the same bfloat16 input), x's layout and dtype kept; with temb, the reference."""
    from pm_kernels import group_norm as G

    K.set_enabled(False)  # the path without Triton
    g = torch.Generator().manual_seed(3)
    x = (mean + torch.randn(2, 64, 13, 11, generator=g)).to(torch.bfloat16).contiguous(memory_format=fmt)
    w, b = torch.randn(2, 64, generator=g)
    calls, native = [], G._native_cpu
    monkeypatch.setattr(G, "_native_cpu", lambda *a: calls.append(1) or native(*a))
    exact = torch.nn.functional.silu(torch.nn.functional.group_norm(x.double(), 16, w.double(), b.double(), 1e-5))
    out = K.group_norm_silu(x, w, b, 16, 1e-5)
    ref = K.group_norm_silu_reference(x, w, b, 16, 1e-5)
    assert calls and out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=fmt)
    assert rel_err(out, exact) <= max(2 * rel_err(ref, exact), 5e-3)
    y = torch.empty_like(x)
    assert K.group_norm_silu(x, w, b, 16, 1e-5, out=y) is y and torch.equal(y, out)
    t = torch.randn(2, 64, generator=g)
    calls.clear()
    with_t = K.group_norm_silu(x, w, b, 16, 1e-5, temb=t)
    assert not calls and torch.equal(with_t, K.group_norm_silu_reference(x, w, b, 16, 1e-5, temb=t))


def test_group_norm_reference_is_torch_group_norm():
    x = torch.randn(2, 8, 3, 3)
    w, b = torch.randn(8), torch.randn(8)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2, w, b, 1e-6))
    assert torch.allclose(K.group_norm_silu_reference(x, w, b, 2, 1e-6), ref, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feat", [37, 320])
def test_geglu(feat, dtype):
    h = torch.randn(3, 5, 2 * feat, generator=torch.Generator().manual_seed(feat)).to(DEVICE, dtype)
    assert K.kernel_path("geglu", h) == "triton"
    out = K.geglu(h)
    assert out.shape == (3, 5, feat) and rel_err(out, K.geglu_reference(h)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_geglu_linear(dtype, bias):
    """The GEMM with the GEGLU in its epilogue against geglu(linear(x)) in fp32: odd row, input and
    feature counts, a strided x (a slice of a wider tensor), several tile shapes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 13, 50, generator=g).to(DEVICE, dtype)[..., 5:45]  # (3, 13, 40), row stride 50
    w = (torch.randn(2 * 24, 40, generator=g) * 0.2).to(DEVICE, dtype)
    b = torch.randn(2 * 24, generator=g).to(DEVICE, dtype) if bias else None
    ref = K.geglu_linear_reference(x, w, b)
    assert K.kernel_path("geglu", x) == "triton"
    out = K.geglu_linear(x, w, b)
    assert out.shape == (3, 13, 24) and out.dtype == dtype and rel_err(out, ref) <= TOL[dtype]
    for block_m, block_n, block_k in [(16, 16, 16), (32, 64, 32)]:  # K 40: a partial last K tile
        out = K.geglu_linear(x, w, b, block_m=block_m, block_n=block_n, block_k=block_k)
        assert rel_err(out, ref) <= TOL[dtype], (block_m, block_n, block_k)
    with pytest.raises(ValueError, match="geglu_linear"):
        K.geglu_linear(x, w[:, :30], b)
    with pytest.raises(ValueError, match="geglu_linear"):
        K.geglu_linear(x, w[:47], None)  # an odd projection width


def test_geglu_linear_reference_is_the_split_path():
    """geglu_linear_reference: diffusers' GEGLU (its Linear, then chunk, gelu, multiply) in fp32."""
    from diffusers.models.activations import GEGLU

    layer = GEGLU(8, 6)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        assert torch.allclose(K.geglu_linear_reference(x, layer.proj.weight, layer.proj.bias), layer(x), atol=1e-6)


def test_geglu_reference_is_diffusers_geglu():
    from diffusers.models.activations import GEGLU

    layer = GEGLU(8, 6)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        assert torch.allclose(K.geglu_reference(layer.proj(x)), layer(x), atol=1e-6)


@pytest.mark.parametrize("split", [False, True], ids=["head-dim-one-tile", "head-dim-two-tiles"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, nq, nk, heads, d", [(2, 37, 77, 3, 40), (1, 20, 5, 1, 24), (2, 16, 200, 2, 8),
                                                 (1, 9, 77, 2, 80)])
def test_attention_split_kv_in_place(b, nq, nk, heads, d, dtype, split, monkeypatch):
    """q a slice of a fused QKV output, k and v from two different contexts (strided views); the
    head dim as one padded tile or (SPLIT_HEAD_DIM) as two: 40 = 32 + 16 (8 padded), 80 = 64 + 16."""
    monkeypatch.setattr(KA, "ALWAYS_TRITON", True)  # d <= 64 and nk 200 (online softmax) too
    monkeypatch.setattr(KA, "SPLIT_HEAD_DIM", split)
    assert KA.default_config(d, nk)["split_d"] == split
    g = torch.Generator().manual_seed(nq + nk)
    q = torch.randn(b, nq, 3 * heads * d, generator=g).to(DEVICE, dtype)[..., heads * d:2 * heads * d]
    kv = torch.randn(b, nk, 2 * heads * d, generator=g).to(DEVICE, dtype)
    k, v = kv[..., :heads * d], kv[..., heads * d:]
    assert K.kernel_path("attention", q) == "triton" and not q.is_contiguous()
    out = K.attention(q, k, v, heads)
    assert out.shape == (b, nq, heads * d) and out.is_contiguous()
    assert rel_err(out, K.attention_reference(q, k, v, heads)) <= TOL[dtype]
    assert rel_err(K.attention(q, k, v, heads, scale=0.3), K.attention_reference(q, k, v, heads, 0.3)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_reads_kv_tables_by_row(dtype, monkeypatch):
    """kv_index: query row b attends to table row kv_index[b] (the torch-cuda K/V tables)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(4, 19, 48, generator=g).to(DEVICE, dtype)
    k, v = torch.randn(2, 5, 77, 48, generator=g).to(DEVICE, dtype)  # 5 table rows
    idx = torch.tensor([0, 0, 3, 4], device=DEVICE)
    monkeypatch.setattr(KA, "ALWAYS_TRITON", True)  # d 24 would go to SDPA
    out = K.attention(q, k, v, 2, kv_index=idx)
    ref = K.attention_reference(q, k[idx], v[idx], 2)
    assert K.kernel_path(q) == "triton" and rel_err(out, ref) <= TOL[dtype]
    with pytest.raises(ValueError, match="kv_index"):
        K.attention(q, k, v, 2, kv_index=idx[:2])


def test_head_dim_tiles():
    """The head dim's column tiles: one power of 2 covering it, or a power of 2 of real columns and a
    second tile (>= 16, tl.dot's least) where the two are narrower than the one."""
    assert [KA.head_dim_tiles(d, False) for d in (8, 24, 40, 64, 80, 160)] == \
        [(16, 0), (32, 0), (64, 0), (64, 0), (128, 0), (256, 0)]
    assert [KA.head_dim_tiles(d, True) for d in (8, 24, 40, 64, 80, 100, 160)] == \
        [(16, 0), (32, 0), (32, 16), (64, 0), (64, 16), (128, 0), (128, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_launch_takes_any_configuration(dtype):
    """launch(): the kernel with a given configuration (the GPU sweep's candidates) computes the same."""
    g = torch.Generator().manual_seed(11)
    q, k, v = torch.randn(3, 2, 45, 80, generator=g).to(DEVICE, dtype)
    ref = K.attention_reference(q, k, v, 2)
    for block_m, block_n, split in [(16, 16, True), (32, 64, False), (64, 32, True)]:
        out = KA.launch(q, k, v, 2, block_m=block_m, block_n=block_n, split_d=split)
        assert rel_err(out, ref) <= TOL[dtype], (block_m, block_n, split)


def test_attention_routes_small_head_dims_and_long_keys_to_sdpa(monkeypatch):
    """attention() picks SDPA where it measured faster (d <= 64, Nk > SHORT_KEYS), Triton elsewhere."""
    monkeypatch.setattr(KA, "attention_sdpa", lambda *a, **kw: "sdpa")
    for nq, nk, heads, d, want in [(4, 77, 2, 24, "sdpa"), (4, 200, 1, 80, "sdpa"), (4, 77, 1, 80, "triton")]:
        q = torch.randn(1, nq, heads * d, device=DEVICE)
        k = torch.randn(1, nk, heads * d, device=DEVICE)
        out = K.attention(q, k, k, heads)
        assert (out == "sdpa") == (want == "sdpa"), (nq, nk, d)


def _attention_case():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 9, 2 * 80, generator=g).to(DEVICE)
    k, v = torch.randn(2, 2, 77, 2 * 80, generator=g).to(DEVICE)
    return q, k, v


def test_attention_takes_fewer_pipeline_stages_where_shared_memory_is_short(monkeypatch):
    """A GPU whose shared memory per block cannot hold the kernel at Triton's default depth (Triton
    raises OutOfResources as it loads it, before it runs): the next depth that loads is used, and
    remembered per configuration. (benchmarks/compile_check.py found this for consumer GPUs.)"""
    from triton.runtime.errors import OutOfResources

    tried = []
    real = KA._attn

    class ShortOfSharedMemory:  # loads at 2 stages or fewer, as a 99 KB GPU would for BLOCK_D 256
        def __getitem__(self, grid):
            def launch(*args, num_stages, **kw):
                tried.append(num_stages)
                if num_stages > 2:
                    raise OutOfResources(151552, 101376, "shared memory")
                return real[grid](*args, num_stages=num_stages, **kw)
            return launch

    monkeypatch.setattr(KA, "_attn", ShortOfSharedMemory())
    monkeypatch.setattr(KA, "_STAGES", {})
    q, k, v = _attention_case()
    ref = K.attention_reference(q, k, v, 2)
    assert rel_err(K.attention(q, k, v, 2), ref) <= TOL[torch.float32]
    assert tried == [3, 2] and list(KA._STAGES.values()) == [(2,)]
    assert rel_err(K.attention(q, k, v, 2), ref) <= TOL[torch.float32]
    assert tried == [3, 2, 2]  # the depth that loaded, straight away


def test_attention_goes_to_sdpa_where_no_depth_fits(monkeypatch):
    """No depth loads (Turing's 64 KB for BLOCK_D 256): PyTorch's attention, and no more tries."""
    from triton.runtime.errors import OutOfResources

    tried = []

    class NeverFits:
        def __getitem__(self, grid):
            def launch(*args, num_stages, **kw):
                tried.append(num_stages)
                raise OutOfResources(98304, 65536, "shared memory")
            return launch

    monkeypatch.setattr(KA, "_attn", NeverFits())
    monkeypatch.setattr(KA, "_STAGES", {})
    q, k, v = _attention_case()
    ref = K.attention_reference(q, k, v, 2)
    assert rel_err(K.attention(q, k, v, 2), ref) <= TOL[torch.float32] and tried == [3, 2, 1]
    assert rel_err(K.attention(q, k, v, 2), ref) <= TOL[torch.float32] and tried == [3, 2, 1]


def test_geglu_linear_takes_the_deepest_pipeline_that_loads(monkeypatch):
    """geglu_linear: where the GPU cannot load the GEMM at depth 3, depth 2 (remembered); where no
    depth loads, the split path (PyTorch's linear + the GEGLU kernel), not an error."""
    from triton.runtime.errors import OutOfResources

    G = importlib.import_module("pm_kernels.geglu")
    tried, limit = [], [2]
    real = G._geglu_mm

    class ShortOfSharedMemory:
        def __getitem__(self, grid):
            def launch(*args, num_stages, **kw):
                tried.append(num_stages)
                if num_stages > limit[0]:
                    raise OutOfResources(131072, 101376, "shared memory")
                return real[grid](*args, num_stages=num_stages, **kw)
            return launch

    monkeypatch.setattr(G, "_geglu_mm", ShortOfSharedMemory())
    monkeypatch.setattr(G, "_GEMM_STAGES", {})
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(5, 24, generator=g), torch.randn(32, 24, generator=g), torch.randn(32, generator=g)
    ref = K.geglu_linear_reference(x, w, b)
    assert rel_err(K.geglu_linear(x, w, b), ref) <= TOL[torch.float32] and tried == [3, 2]
    assert rel_err(K.geglu_linear(x, w, b), ref) <= TOL[torch.float32] and tried == [3, 2, 2]
    limit[0] = 0  # nothing loads (another configuration: its own tries)
    assert rel_err(K.geglu_linear(x, w, b, block_m=32), ref) <= TOL[torch.float32] and tried[3:] == [3, 2, 1]
    with pytest.raises(OutOfResources):  # an explicit depth is that depth only
        K.geglu_linear(x, w, b, num_stages=3)


def test_attention_errors_other_than_resources_raise(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                raise RuntimeError("launch failed")
            return launch

    monkeypatch.setattr(KA, "_attn", Broken())
    monkeypatch.setattr(KA, "_STAGES", {})
    with pytest.raises(RuntimeError, match="launch failed"):
        K.attention(*_attention_case(), 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("n, c, h, w", [(2, 40, 5, 7), (1, 3, 1, 9)])
def test_add_bias_residual(n, c, h, w, fmt, dtype):
    g = torch.Generator().manual_seed(c + h)
    hh, x = (torch.randn(2, n, c, h, w, generator=g) * 4).to(DEVICE, dtype)
    hh = hh.contiguous(memory_format=fmt)
    bias = torch.randn(c, generator=g).to(DEVICE, dtype)
    assert K.kernel_path("add_bias_residual", hh) == "triton"
    exact = hh.double() + x.double() + bias.double()[None, :, None, None]
    for xin in (x.contiguous(memory_format=fmt), x.contiguous()):  # x in h's format, and NCHW
        out = K.add_bias_residual(hh, xin, bias)
        assert out.dtype == dtype and (out.is_contiguous(memory_format=fmt) or h == 1)
        assert rel_err(out, K.add_bias_residual_reference(hh, xin, bias)) <= TOL[dtype] / 2
        assert rel_err(out, exact) <= TOL[dtype] / 2
    assert rel_err(K.add_bias_residual(hh, x, None), hh.double() + x.double()) <= TOL[dtype] / 2
    inplace = hh.clone()
    assert K.add_bias_residual(inplace, x, bias, out=inplace) is inplace  # FastUNet writes into conv2's output
    assert rel_err(inplace, exact) <= TOL[dtype] / 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 40), (3, 320), (1, 5, 1, 37)])
def test_add_layer_norm(shape, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    a, r = torch.randn(2, *shape, generator=g).to(DEVICE, dtype)
    r = r * 3 + 5  # a residual stream with a mean: the statistics must not lose it
    width = shape[-1]
    w, b = torch.randn(2, width, generator=g).to(DEVICE, dtype)
    assert K.kernel_path("add_layer_norm", a) == "triton"
    for weight, bias in ((w, b), (None, None), (w, None)):
        s, y = K.add_layer_norm(a, r, weight, bias, 1e-5)
        s_ref, y_ref = K.add_layer_norm_reference(a, r, weight, bias, 1e-5)
        assert s.shape == y.shape == a.shape and s.dtype == y.dtype == dtype
        assert rel_err(s, s_ref) <= TOL[dtype] / 2
        exact = torch.nn.functional.layer_norm(s.double(), (width,), None if weight is None else weight.double(),
                                               None if bias is None else bias.double(), 1e-5)  # of the stored s
        assert rel_err(y, exact) <= TOL[dtype] and rel_err(y, y_ref) <= TOL[dtype]
    sb = torch.randn(width, generator=g).to(DEVICE, dtype)  # a bias on the returned stream only
    s2, y2 = K.add_layer_norm(a, r, w, b, 1e-5, s_bias=sb)
    s0, y0 = K.add_layer_norm(a, r, w, b, 1e-5)
    assert torch.equal(y2, y0) and rel_err(s2, s0.double() + sb.double()) <= TOL[dtype] / 2
    assert rel_err(s2, K.add_layer_norm_reference(a, r, w, b, 1e-5, sb)[0]) <= TOL[dtype]  # (two roundings there)


def test_add_layer_norm_large_mean():
    """Rows with mean 300 and std 1: the two-pass (in registers) variance keeps fp32 accuracy; against float64."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 320, generator=g, dtype=torch.float64)
    r = 300 + torch.randn(6, 320, generator=g, dtype=torch.float64)
    s, y = K.add_layer_norm(a.float().to(DEVICE), r.float().to(DEVICE), None, None, 1e-5)
    exact = torch.nn.functional.layer_norm(s.double().cpu(), (320,), eps=1e-5)
    assert rel_err(y.cpu(), exact) <= 1e-5


@pytest.mark.parametrize("gn_impl", GN_IMPLS, indirect=True)
def test_group_norm_reads_an_expanded_time_row(gn_impl):
    """FastUNet's time tables hand every sample the same (1, C) row expanded to (N, C) (batch stride 0):
    read in place, the same result as the materialised (N, C) tensor."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, 6, 5, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(2, 40, generator=g).to(DEVICE)
    row = torch.randn(1, 40, generator=g).to(DEVICE)
    out = K.group_norm_silu(x, w, b, 8, 1e-5, temb=row.expand(3, 40))
    assert torch.equal(out, K.group_norm_silu(x, w, b, 8, 1e-5, temb=row.expand(3, 40).contiguous()))
    with pytest.raises(ValueError, match="temb"):
        K.group_norm_silu(x, w, b, 8, 1e-5, temb=row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("copies", [1, 2])
def test_scaled_copies(copies, fmt, dtype):
    g = torch.Generator().manual_seed(copies)
    x = torch.randn(3, 4, 5, 7, generator=g).to(DEVICE)
    scale = torch.rand(6, generator=g).to(DEVICE)
    step = torch.tensor(4, device=DEVICE)
    assert K.kernel_path("step_update", x) == "triton"
    y = K.scaled_copies(x, scale, step, copies, dtype, fmt)
    assert y.shape == (3 * copies, 4, 5, 7) and y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    want = (x * scale[4]).to(dtype)
    for k in range(copies):
        assert torch.equal(y[3 * k:3 * (k + 1)], want)
    assert torch.equal(y, K.scaled_copies_reference(x, scale, step, copies, dtype, fmt))


@pytest.mark.parametrize("clip", [float("inf"), 1.5])
@pytest.mark.parametrize("layout", ["halves-of-one-channels-last", "two-nchw-fp32"])
def test_guided_update(layout, clip):
    """The step's guidance + affine update in place, against its PyTorch reference (the ops the step
    graph ran before): every coefficient column non-zero, the clamp active or not."""
    g = torch.Generator().manual_seed(5)
    n = 2
    x, x0_prev, noise = (torch.randn(n, 4, 6, 5, generator=g).to(DEVICE) for _ in range(3))
    coef = torch.randn(8, 10, generator=g).to(DEVICE)
    step, guidance, clip_t = (torch.tensor(v, device=DEVICE) for v in (3, 7.5, clip))
    if layout == "two-nchw-fp32":  # sequential guidance: two UNet calls
        uncond, cond = (torch.randn(n, 4, 6, 5, generator=g).to(DEVICE) for _ in range(2))
    else:  # one fp16 channels-last call on [uncond; cond]
        out = torch.randn(2 * n, 4, 6, 5, generator=g).to(DEVICE, torch.float16).contiguous(
            memory_format=torch.channels_last)
        uncond, cond = out[:n], out[n:]
    states = [(x.clone(), x0_prev.clone()) for _ in range(2)]
    assert K.kernel_path("step_update", x) == "triton"
    K.guided_update(uncond, cond, *states[0][:2], noise, coef, step, guidance, clip_t)
    K.guided_update_reference(uncond, cond, *states[1][:2], noise, coef, step, guidance, clip_t)
    for got, want in zip(states[0], states[1]):
        assert rel_err(got, want) <= 1e-5
    assert not torch.equal(states[0][0], x)  # it did update in place
    if clip < float("inf"):
        assert float(states[0][1].abs().max()) <= clip
    with pytest.raises(ValueError, match="same shape and strides"):
        K.guided_update(uncond, cond.contiguous(), x, x0_prev, noise, coef, step, guidance, clip_t) \
            if layout != "two-nchw-fp32" else K.guided_update(uncond[:1], cond, x, x0_prev, noise, coef, step,
                                                                 guidance, clip_t)
    with pytest.raises(ValueError, match="float32"):
        K.guided_update(uncond, cond, x.half(), x0_prev, noise, coef, step, guidance, clip_t)


def test_gpus_older_than_triton_supports_run_the_references(monkeypatch):
    """Triton compiles for compute capability 7.0 and newer: on a Pascal GPU (GTX 10xx, P100) every
    kernel takes its PyTorch reference ("cannot run here"), on Volta and newer its Triton path."""
    import types

    d = importlib.import_module("pm_kernels._dispatch")
    monkeypatch.setattr(d, "interpreting", lambda: False)  # (conftest's interpreter is for CPU tensors)
    on_gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    for cap, want in (((6, 1), "reference"), ((6, 0), "reference"), ((7, 0), "triton"), ((9, 0), "triton")):
        monkeypatch.setattr(d, "capability", lambda index, cap=cap: cap)
        assert K.kernel_path("group_norm_silu", on_gpu) == want, cap


def test_fallbacks_and_bad_shapes():
    x = torch.randn(1, 8, 2, 2)
    K.set_enabled(False)
    assert K.kernel_path(x) == "reference"
    assert torch.equal(K.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-5),
                       K.group_norm_silu_reference(x, torch.ones(8), torch.zeros(8), 2, 1e-5))
    q = torch.randn(1, 4, 8)
    assert torch.allclose(K.attention(q, q, q, 2), K.attention_reference(q, q, q, 2), atol=1e-5)
    h = torch.randn(2, 3, 10)
    assert K.kernel_path("geglu", h) == "reference" and torch.equal(K.geglu(h), K.geglu_reference(h))
    K.set_enabled(True)
    with pytest.raises(ValueError, match="unknown kernel"):
        K.kernel_path("layer_norm", x)
    with pytest.raises(ValueError, match="groups"):
        K.group_norm_silu(x, torch.ones(8), torch.zeros(8), 3, 1e-5)
    with pytest.raises(ValueError, match="odd"):
        K.geglu(torch.randn(2, 5))
    with pytest.raises(ValueError, match="heads"):
        K.attention(q, torch.randn(1, 3, 6), torch.randn(1, 3, 6), 2)
    with pytest.raises(ValueError, match="add_bias_residual"):
        K.add_bias_residual(x, torch.randn(1, 8, 2, 3), None)
    with pytest.raises(ValueError, match="add_bias_residual"):
        K.add_bias_residual(x, x, torch.ones(7))
    with pytest.raises(ValueError, match="add_layer_norm"):
        K.add_layer_norm(h, h.half(), None, None, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        K.add_layer_norm(h, h, torch.ones(9), None, 1e-5)


def test_a_failing_kernel_raises(monkeypatch):
    """The fallback is for "cannot run here" only: a kernel that fails must not turn into a silent
    reference result."""
    gn = importlib.import_module("pm_kernels.group_norm")

    def broken(*args, **kwargs):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(gn, "_gn_apply", _Launch(broken))
    x = torch.randn(1, 8, 2, 2, device=DEVICE)
    with pytest.raises(RuntimeError, match="launch failed"):
        K.group_norm_silu(x, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE), 2, 1e-5)


class _Launch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) calls fn; with `real`, the real kernel
    is launched and each grid is recorded in `grids`."""

    def __init__(self, fn, real=None, grids=None):
        self.fn, self.real, self.grids = fn, real, grids

    def __getitem__(self, grid):
        if self.real is None:
            return self.fn
        self.grids.append(grid)
        return self.real[grid]


def test_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/bench_kernels.py's own code path: on the CPU its --device cpu dry run (interpreter,
    tiny shapes), on a GPU a short real run of a few ops; records well-formed, no case failing."""
    bench = importlib.import_module("pm_bench.bench_kernels")
    out = tmp_path / "k.jsonl"
    ops = ("group_norm_temb_silu,add_layer_norm,add_bias_residual,step_update,cross_attention_77,self_attention,"
           "dequant_int8,gemm_fp8_e4m3,geglu_linear")
    assert bench.main(["--device", DEVICE, "--reps", "2", "--only", ops, "--out", str(out)]) == 0
    import json

    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["op"] for r in recs} >= set(ops.split(",")) - {"gemm_fp8_e4m3"}
    for r in recs:
        assert r["schema"] == "pm-bench-kernels/1" and r["status"] == "ok", r.get("error")
        assert r["finite"] and r["max_rel_err"] < (0.1 if r["op"].startswith("gemm_fp8") else 1e-2)
        assert set(r["ours_ms"]) == {"p20", "p50", "p80"} and r["ref_ms"] and r["commit"] and r["triton"]


@pytest.mark.slow  # (11-16 s: the sweep script end to end; test_benchmark_runs_end_to_end stays)
def test_kernel_sweep_runs_end_to_end(tmp_path):
    """benchmarks/sweep_kernels.py's code path (its --device cpu dry run on the CPU): the peer and each
    candidate configuration per case (attention: head dim 40 as one tile and as two; geglu_linear),
    every output checked against the reference; the summary names the best candidate per case."""
    sweep = importlib.import_module("pm_bench.sweep_kernels")
    out = tmp_path / "s.jsonl"
    assert sweep.main(["--device", DEVICE, "--reps", "1", "--out", str(out)]) == 0
    import json

    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["schema"] == "pm-sweep/1" and r["status"] == "ok" and r["commit"] for r in recs)
    assert all(r["rel_err"] <= TOL[torch.float32 if DEVICE == "cpu" else torch.float16] for r in recs)
    for op, peer in (("self_attention", "sdpa"), ("cross_attention_77", "sdpa"), ("geglu_linear", "cublas_then_geglu")):
        case = [r for r in recs if r["op"] == op]
        assert [r["candidate"] for r in case if r["peer"]] == [peer]
        triton_recs = [r for r in case if not r["peer"]]
        assert len(triton_recs) >= 2 and sum(r["default"] for r in triton_recs) == 1
        if op != "geglu_linear":
            assert {tuple(r["tiles"]) for r in triton_recs} == {(64, 0), (32, 16)}
    lines = sweep.summary_lines(recs)
    assert len(lines) == 2 + 3 and all("x |" in line for line in lines[2:])


def test_pdl_is_a_no_op_off_hopper():
    """set_pdl(True) launches with programmatic dependent launch only on CUDA GPUs of compute
    capability 9.0+: on CPU tensors (the interpreter) the kernels take PDL=False and no launch option,
    and compute the same."""
    from pm_kernels import _dispatch

    x = torch.randn(2, 8, 4, 4)
    w = torch.randn(8)
    before = K.group_norm_silu(x, w, w, 4, 1e-5)
    with K.pdl_kept(True):
        assert K.pdl() and _dispatch.pdl_options(x) == {"PDL": False}
        assert torch.equal(K.group_norm_silu(x, w, w, 4, 1e-5), before)
    assert not K.pdl()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a CUDA GPU of compute capability 9.0+")
def test_pdl_launches_compute_the_same_on_gpu():
    """The kernels launched with programmatic dependent launch (each waits for the one before, then
    lets the next launch), eagerly and captured in a CUDA graph, give exactly what they give without:
    a chain where each kernel reads the one before's output (GroupNorm's three passes, the residual,
    add + LayerNorm, GEGLU, the GEGLU GEMM, cross-attention)."""
    g = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(2, 320, 64, 64, device="cuda", generator=g).half().contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(2, 320, device="cuda", generator=g).half()
    wf = (torch.randn(2560, 320, device="cuda", generator=g) * 0.05).half()
    kv = torch.randn(2, 77, 320, device="cuda", generator=g).half()

    def chain():
        h = K.group_norm_silu(x, w, b, 32, 1e-5)
        h = K.add_bias_residual(h, x, b)
        t = h.permute(0, 2, 3, 1).reshape(2, 4096, 320)
        s, y = K.add_layer_norm(t, t, w, b, 1e-5)
        a = K.attention(y, kv, kv, 8)
        f = K.geglu_linear(a + s, wf, None)
        return K.geglu(torch.cat([f, f], -1))

    ref = chain()
    with K.pdl_kept(True):
        assert torch.equal(chain(), ref)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


SD15 = [(320, 64), (640, 32), (1280, 16), (1280, 8), (960, 32), (2560, 8)]  # (channels, latent side), 512 px


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("c, side", SD15)
def test_sd15_shapes_on_gpu(c, side, monkeypatch):
    """Compiled kernels at SD 1.5's shapes (batch 2, fp16): GroupNorm in both layouts, GEGLU at the
    feed-forward width, the bias + residual and add + LayerNorm kernels, cross-attention with 77 keys
    at the attention widths (d = 40, 80, 160; the head dim as one tile and as two), self-attention."""
    g = torch.Generator(device="cuda").manual_seed(c)
    x = (3 + torch.randn(2, c, side, side, device="cuda", generator=g)).half()
    w, b = torch.randn(2, c, device="cuda", generator=g)
    t = torch.randn(2, c, device="cuda", generator=g).half()
    assert K.kernel_path("group_norm_silu", x) == "triton"
    gn = importlib.import_module("pm_kernels.group_norm")
    for impl in gn.IMPLS:  # both implementations, compiled
        monkeypatch.setattr(gn, "_IMPL", impl)
        for fmt in (torch.channels_last, torch.contiguous_format):
            xf = x.contiguous(memory_format=fmt)
            out = K.group_norm_silu(xf, w, b, 32, 1e-5, temb=t)
            assert out.is_contiguous(memory_format=fmt)
            assert rel_err(out, K.group_norm_silu_reference(xf, w, b, 32, 1e-5, temb=t)) <= 1e-2, impl
    h = torch.randn(2, side * side, 8 * c, device="cuda", generator=g).half()
    assert rel_err(K.geglu(h), K.geglu_reference(h)) <= 1e-2
    xc = x.contiguous(memory_format=torch.channels_last)  # a ResNet's end; the transformer's add + LayerNorm
    assert rel_err(K.add_bias_residual(xc, xc.flip(0), t[0]), K.add_bias_residual_reference(xc, xc.flip(0), t[0])) <= 1e-2
    a = torch.randn(2, side * side, c, device="cuda", generator=g).half()
    s_k, y_k = K.add_layer_norm(a, a.flip(1), t[0], t[1], 1e-5, s_bias=t[0])
    s_r, y_r = K.add_layer_norm_reference(a, a.flip(1), t[0], t[1], 1e-5, s_bias=t[0])
    assert rel_err(s_k, s_r) <= 1e-2 and rel_err(y_k, y_r) <= 1e-2
    if c not in (320, 640, 1280):  # SD 1.5's attention widths
        return
    xf = torch.randn(2, side * side, c, device="cuda", generator=g).half()  # the feed-forward's GEGLU projection
    wf = (torch.randn(8 * c, c, device="cuda", generator=g) * c ** -0.5).half()
    bf = torch.randn(8 * c, device="cuda", generator=g).half()
    assert rel_err(K.geglu_linear(xf, wf, bf), K.geglu_linear_reference(xf, wf, bf)) <= 1e-2
    q = torch.randn(2, side * side, c, device="cuda", generator=g).half()
    k, v = torch.randn(2, 2, 77, c, device="cuda", generator=g).half()
    monkeypatch.setattr(KA, "ALWAYS_TRITON", True)  # d 40 would go to SDPA
    ref = K.attention_reference(q, k, v, 8)
    assert rel_err(K.attention(q, k, v, 8), ref) <= 1e-2
    assert rel_err(KA.launch(q, k, v, 8, **{**KA.default_config(c // 8, 77), "split_d": True}), ref) <= 1e-2
    ref = K.attention_reference(q, q, q, 8)  # self-attention (64 x 64: the reference's fp32 scores take 1 GiB)
    assert rel_err(K.attention(q, q, q, 8), ref) <= 1e-2
    assert rel_err(KA.launch(q, q, q, 8, block_m=64, block_n=64, split_d=True), ref) <= 1e-2

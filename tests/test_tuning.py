"""pm_kernels.tuning: the on-device choice between implementations (kernels/tuning.py).

On the CPU the candidates are timed by wall clock (on a GPU: CUDA graphs), and the Triton
candidates run under the interpreter (conftest sets TRITON_INTERPRET=1 and a session-private
PM_KERNELS_TUNE_DIR). The selection rules (fastest of the correct ones; failures and wrong outputs
left out and recorded), the cache file (atomic, per device and software, a bad file ignored) and
the tunable kernels' candidates (each correct, in-place outputs untouched) are what is tested here;
which candidate wins on a GPU is for the GPU check (variant torch-cuda-untuned is the A/B).
"""

from __future__ import annotations

import importlib
import json
import os
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import pm_kernels as K  # noqa: E402

T = importlib.import_module("pm_kernels.tuning")
KA = importlib.import_module("pm_kernels.attention")
GN = importlib.import_module("pm_kernels.group_norm")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Each test: its own cache folder, no table in memory, tuning on, short timings."""
    monkeypatch.setenv("PM_KERNELS_TUNE_DIR", str(tmp_path / "tuning"))
    monkeypatch.setattr(T, "REPS", 2)
    monkeypatch.setattr(T, "TRIALS", 3)
    T.forget()
    with T.enabled_kept(True):
        yield
    T.forget()


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def sleepy(value, seconds):
    def call():
        time.sleep(seconds)
        return value.clone()
    return call


def test_outside_a_session_the_first_candidate_runs():
    x = torch.ones(4)
    calls = []
    cands = {"a": lambda: calls.append("a") or x, "b": lambda: calls.append("b") or x}
    assert T.choose("op", ("float32", 4), cands, CPU) == "a"
    assert calls == [] and T.choices(CPU) == {}  # nothing measured, nothing stored


def test_a_session_keeps_the_fastest_correct_candidate_and_saves_it():
    x = torch.arange(8.0)
    cands = {"slow": sleepy(x, 0.004), "fast": sleepy(x, 0.0)}
    with T.session("sig-1", CPU) as active:
        assert active
        assert T.choose("op", ("float32", 8), cands, CPU) == "fast"
        # on disk already, before the session ends (a process killed here keeps it), not yet done
        data = json.loads(T.cache_file(CPU).read_text())
        assert data["choices"]["op|float32|8"]["choice"] == "fast" and data["sessions"] == []
    entry = T.choices(CPU)["op|float32|8"]
    assert entry["choice"] == "fast" and entry["us"]["slow"] > entry["us"]["fast"]
    # on disk, read back by a new process (forget: nothing in memory)
    data = json.loads(T.cache_file(CPU).read_text())
    assert data["choices"]["op|float32|8"]["choice"] == "fast" and data["sessions"] == ["sig-1"]
    assert data["device"] == T.device_key(CPU) and "src" in data["device"]
    T.forget()
    assert T.choose("op", ("float32", 8), cands, CPU) == "fast"  # outside any session: the stored choice
    with T.session("sig-1", CPU) as active:
        assert not active  # done before: the caller skips its tuning work


def test_a_spent_budget_leaves_the_default_and_the_next_session_measures():
    x = torch.arange(4.0)
    calls = []
    cands = {"slow": lambda: calls.append("slow") or sleepy(x, 0.004)(),
             "fast": lambda: calls.append("fast") or x.clone()}
    cut = T.cut_short()
    with pytest.warns(UserWarning, match="budget ran out; 1 call"), T.session("sig-b", CPU, budget_s=0) as active:
        assert active
        time.sleep(0.001)
        assert T.choose("op", ("float32", 4), cands, CPU) == "slow"  # the default, unmeasured
    assert calls == [] and T.cut_short() == cut + 1
    assert json.loads(T.cache_file(CPU).read_text())["sessions"] == []  # not done: the next run measures
    T.forget()
    with T.session("sig-b", CPU, budget_s=60) as active:
        assert active
        assert T.choose("op", ("float32", 4), cands, CPU) == "fast"
    assert "slow" in calls and "fast" in calls
    data = json.loads(T.cache_file(CPU).read_text())
    assert data["sessions"] == ["sig-b"] and data["choices"]["op|float32|4"]["choice"] == "fast"
    assert T.cut_short() == cut + 1


def test_wrong_failing_and_unloadable_candidates_are_left_out():
    x = torch.arange(1.0, 9.0)

    def broken():
        raise RuntimeError("kernel exploded")

    cands = {"ref": sleepy(x, 0.003), "wrong": lambda: x * 1.5, "nan": lambda: x * float("nan"),
             "broken": broken, "too-big": lambda: None, "ok": sleepy(x, 0.0)}
    with T.session("s", CPU), pytest.warns(UserWarning, match="candidate broken failed"):
        assert T.choose("op", ("float32",), cands, CPU) == "ok"
    entry = T.choices(CPU)["op|float32"]
    assert set(entry["us"]) == {"ref", "ok"}
    assert entry["rejected"]["wrong"] == pytest.approx(0.5) and "nan" in entry["rejected"]
    assert "kernel exploded" in entry["failed"]["broken"] and "does not load" in entry["failed"]["too-big"]


def test_when_every_candidate_fails_the_first_error_is_raised():
    def broken(msg):
        def call():
            raise ValueError(msg)
        return call

    with T.session("s", CPU), pytest.warns(UserWarning), pytest.raises(ValueError, match="first"):
        T.choose("op", ("float32",), {"a": broken("first"), "b": broken("second")}, CPU)


def test_tuning_off_ignores_stored_choices_and_opens_no_session():
    x = torch.ones(3)
    cands = {"a": sleepy(x, 0.003), "b": sleepy(x, 0.0)}
    with T.session("s", CPU):
        assert T.choose("op", ("float32",), cands, CPU) == "b"
    with T.enabled_kept(False):
        assert T.choose("op", ("float32",), cands, CPU) == "a"
        with T.session("other", CPU) as active:
            assert not active
    assert T.choose("op", ("float32",), cands, CPU) == "b"


def test_a_file_that_is_not_a_table_is_ignored_and_replaced(tmp_path):
    path = T.cache_file(CPU)
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "choices": "not a dict"}')
    x = torch.ones(2)
    with pytest.warns(UserWarning, match="not a tuning table"):
        with T.session("s", CPU):
            T.choose("op", ("float32",), {"a": sleepy(x, 0.003), "b": sleepy(x, 0.0)}, CPU)
    assert json.loads(path.read_text())["choices"]["op|float32"]["choice"] == "b"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    T.forget()
    path.write_text("{ truncated")
    with pytest.warns(UserWarning, match="ignoring"):
        assert T.choices(CPU) == {}


def test_an_unwritable_cache_folder_keeps_the_choices_in_the_process(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PM_KERNELS_TUNE_DIR", str(blocker / "sub"))  # a folder under a file: cannot exist
    T.forget()
    x = torch.ones(2)
    with pytest.warns(UserWarning, match="cannot write"), T.session("s", CPU):
        assert T.choose("op", ("float32",), {"a": sleepy(x, 0.003), "b": sleepy(x, 0.0)}, CPU) == "b"
    assert T.choose("op", ("float32",), {"a": sleepy(x, 0.003), "b": sleepy(x, 0.0)}, CPU) == "b"


def test_cache_files_are_per_device_and_software(monkeypatch):
    first = T.cache_file(CPU)
    T._device_key.cache_clear()
    monkeypatch.setattr(T, "_sources_hash", lambda: "changed")
    try:
        assert T.cache_file(CPU) != first and "srcchanged" in T.device_key(CPU)
    finally:
        T._device_key.cache_clear()


# ------------------------------------------------------------------ the tunable kernels' candidates
# (on CPU tensors: the Triton candidates need the interpreter, which conftest sets where no CUDA GPU is;
# on a GPU the gpu test of tests/test_torch_cuda.py measures them through the torch-cuda backend)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the Triton candidates run on CPU tensors only under TRITON_INTERPRET=1")


def _session_entry(op):
    entries = [e for k, e in T.choices(CPU).items() if k.startswith(op + "|")]
    assert len(entries) == 1, T.choices(CPU)
    return entries[0]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d, nk, indexed", [(40, 77, True), (80, 77, False), (24, 150, False)])
def test_attention_candidates_all_run_and_the_choice_is_correct(d, nk, indexed, dtype):
    g = torch.Generator().manual_seed(d + nk)
    heads, b, nq = 2, 2, 33
    q = torch.randn(b, nq, heads * d, generator=g).to(dtype)
    k, v = (torch.randn(3 if indexed else b, nk, heads * d, generator=g).to(dtype) for _ in range(2))
    idx = torch.tensor([2, 0]) if indexed else None
    ref = K.attention_reference(q, k, v, heads, kv_index=idx)
    untuned = K.attention(q, k, v, heads, kv_index=idx)
    with T.session("attn", CPU):
        out = K.attention(q, k, v, heads, kv_index=idx)
    entry = _session_entry("attention")
    names = {KA.config_name(c) for c in KA.tuning_configs(d, nk)} | {"sdpa"}
    assert set(entry["us"]) == names and "failed" not in entry and "rejected" not in entry
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) <= tol and rel_err(untuned, ref) <= tol
    assert rel_err(K.attention(q, k, v, heads, kv_index=idx), ref) <= tol  # the stored choice, outside the session
    assert len(KA.tuning_configs(d, nk)) == len(names) - 1  # no duplicate configurations


def test_attention_untuned_default_is_the_routing_rule():
    q = torch.randn(1, 5, 2 * 40)
    k = v = torch.randn(1, 77, 2 * 40)
    first = next(iter(KA._candidates(q, k, v, 2, 40 ** -0.5, None)))
    assert first == "sdpa"  # d 40 <= SDPA_MAX_HEAD_DIM
    q, k = torch.randn(1, 5, 2 * 80), torch.randn(1, 77, 2 * 80)
    assert next(iter(KA._candidates(q, k, k, 2, 80 ** -0.5, None))) == KA.config_name(KA.default_config(80, 77))


@interpreted
@pytest.mark.parametrize("m", [7, pytest.param(1030, marks=pytest.mark.slow)])  # (1030: 23 s, its n128 candidate)
def test_geglu_projection_candidates(m, monkeypatch):
    monkeypatch.setattr(T, "REPS", 1)  # each interpreted GEMM at m=1030 takes about a second
    monkeypatch.setattr(T, "TRIALS", 1)
    g = torch.Generator().manual_seed(m)
    x, w, b = torch.randn(m, 24, generator=g), torch.randn(32, 24, generator=g), torch.randn(32, generator=g)
    ref = K.geglu_linear_reference(x, w, b)
    for fused in (False, True, None):
        assert rel_err(K.geglu_projection(x, w, b, fused=fused), ref) <= 1e-4
    with T.session("ff", CPU):
        out = K.geglu_projection(x, w, b)
    entry = _session_entry("geglu_projection")
    assert set(entry["us"]) == {"split", "geglu-gemm"} | ({"geglu-gemm-n128"} if m >= 1024 else set())
    assert rel_err(out, ref) <= 1e-4


@interpreted
def test_group_norm_tuned_in_place_keeps_the_input_for_every_candidate():
    """The candidates of a call with out=x write fresh tensors: x reaches the chosen one intact."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 6, 5, generator=g).to(memory_format=torch.channels_last)
    w, b, temb = torch.randn(40, generator=g), torch.randn(40, generator=g), torch.randn(2, 40, generator=g)
    ref = K.group_norm_silu_reference(x, w, b, 8, 1e-5, temb=temb)
    assert K.group_norm_impl() == "tuned"
    with T.session("gn", CPU):
        out = K.group_norm_silu(x, w, b, 8, 1e-5, temb=temb, out=x)
    assert out.data_ptr() == x.data_ptr() and rel_err(out, ref) <= 1e-4
    entry = _session_entry("group_norm_silu")
    assert set(entry["us"]) == {"tiled", "grouped"}
    assert GN.launches((2, 40, 6, 5), 8, "tuned") == GN.launches((2, 40, 6, 5), 8, "tiled")


@interpreted
def test_fast_unet_feed_forward_takes_the_tuned_projection(monkeypatch):
    """FastUNet's default (geglu_gemm None) goes through geglu_projection on the Triton path."""
    from pm_runtime.modeling.fast_unet import FastUNet

    seen = []
    real = K.geglu_projection
    monkeypatch.setattr(K, "geglu_projection", lambda *a, **kw: seen.append(a[0].shape) or real(*a, **kw))

    class Proj(torch.nn.Linear):
        pass

    fast = FastUNet.__new__(FastUNet)
    fast.k, fast.geglu_gemm = K, None
    proj = Proj(8, 12)
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        out = fast._geglu(proj, [x])
        ref = K.geglu_reference(proj(x))
    assert seen == [x.shape] and rel_err(out, ref) <= 1e-4

"""The hires fix: latent upscaling against PyTorch's interpolate (what AUTOMATIC1111's "Latent"
upscalers call), and the pipeline's second pass (the pass's schedule against diffusers is in
test_schedulers: test_a_pass_from_a_later_step_matches_diffusers)."""

from __future__ import annotations

import numpy as np
import pytest

from pm_runtime.latent_upscale import UPSCALERS, upscale

torch = pytest.importorskip("torch")

TORCH_MODE = {"latent": "bilinear", "latent-nearest": "nearest", "latent-nearest-exact": "nearest-exact"}


@pytest.mark.parametrize("mode", UPSCALERS)
@pytest.mark.parametrize("size, out", [((32, 32), (48, 48)), ((7, 5), (13, 11)), ((32, 40), (64, 80)),
                                       ((8, 8), (8, 8)), ((6, 9), (18, 27)), ((4, 6), (3, 5))])
def test_latent_upscale_matches_pytorch_interpolate(mode, size, out):
    x = np.random.default_rng(sum(size + out)).standard_normal((2, 4, *size)).astype(np.float32)
    extra = {"align_corners": False} if mode == "latent" else {}
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=out, mode=TORCH_MODE[mode], antialias=False,
                                          **extra).numpy()
    got = upscale(x, *out, mode=mode)
    assert got.dtype == np.float32 and got.shape == ref.shape
    if mode == "latent":
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)  # float32 sums in another order
    else:
        np.testing.assert_array_equal(got, ref)


def test_latent_upscale_refuses_what_it_does_not_know():
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="unknown latent upscaler 'bicubic'"):
        upscale(x, 16, 16, "bicubic")
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        upscale(x[0], 16, 16)


# ---------------------------------------------------------------- the pipeline's second pass
PROMPT = "a photo of <persona> as a knight"
KW = dict(seed=5, steps=4, height=256, width=256)
HIRES = dict(hires_scale=1.5, hires_steps=3, denoising_strength=0.5)


@pytest.fixture(scope="module")
def pipe(run_bundle):
    from pm_runtime.pipeline import Pipeline

    return Pipeline.load(run_bundle, backend="onnxruntime", concept="alice")


def test_the_hires_pass_denoises_the_upscaled_first_pass(pipe, calls):
    """The second pass starts from the first pass's final latents, upscaled and noised to step `start` of its
    own schedule (its noise from the seed's pass-1 stream), runs that schedule's last steps at the larger
    size with their own stage contexts, and the VAE decodes its result; A1111's parameters record it."""
    import pm_runtime.schedulers as S
    from pm_runtime import noise
    from pm_runtime.latent_upscale import upscale
    from pm_runtime.specs import UNET, VAE_DECODER

    pipe.generate(PROMPT, **KW)
    first = [i["latent"] for name, i, _ in calls if name == VAE_DECODER][0]  # the first pass alone
    calls.clear()
    g = pipe.generate(PROMPT, **KW, **HIRES)
    unets = [i for name, i, _ in calls if name == UNET]
    assert [u["sample"].shape[2:] for u in unets] == [(32, 32)] * 4 + [(48, 48)] * 3
    h = g.settings.hires
    assert (h.height, h.width, h.schedule_steps, h.start, h.pass_steps) == (384, 384, 6, 3, 3)
    full = S.make_tables("dpmpp-2m", pipe.bundle.scheduler_config, 6)
    tables = S.slice_tables(full, 3)
    np.testing.assert_array_equal(g.hires_timesteps, full.timesteps[3:])
    assert [float(u["timestep"][0]) for u in unets[4:]] == [float(t) for t in full.timesteps[3:]]
    x0 = upscale(first, 48, 48)
    eps = noise.initial_latents(5, x0.shape, pass_=1)
    expect = S.start_latents(x0, eps, tables) * np.float32(tables.input_scale[0])
    np.testing.assert_allclose(unets[4]["sample"], np.concatenate([expect, expect]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(eps, noise.initial_latents(5, x0.shape))  # a stream of its own
    vae = [i["latent"] for name, i, _ in calls if name == VAE_DECODER]
    assert len(vae) == 1 and vae[0].shape[2:] == (48, 48) and g.images.shape == (1, 384, 384, 3)
    assert g.hires_plan == pipe.plan(6, "dpmpp-2m")[1][3:] and len(g.plan) == 4
    assert g.timings["first_pass_unet_steps"] == 4 and g.timings["unet_steps"] == 7
    text = g.parameters()
    assert "Size: 256x256" in text  # the first pass's, as A1111 records it
    assert "Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent" in text
    assert g.summary()["settings"]["hires"]["height"] == 384


def test_hires_batches_and_noise_per_step(pipe):
    """Several images (one group) and a sampler with per-step noise: the same seed makes the same images,
    each of the larger size; the progress callback counts both passes; hires_steps 0 takes --steps."""
    seen = []
    kw = dict(KW, num_images=2, scheduler="euler-a", hires_scale=1.25, denoising_strength=0.4)
    a = pipe.generate(PROMPT, **kw, callback=lambda i, n: seen.append((i, n)))
    b = pipe.generate(PROMPT, **kw)
    h = a.settings.hires
    assert h.steps == 0 and h.pass_steps == 4 and (h.schedule_steps, h.start) == (10, 6)
    assert a.images.shape == (2, 320, 320, 3) and np.array_equal(a.images, b.images)
    assert seen == [(i, 8) for i in range(1, 9)]
    assert "Hires steps" not in a.parameters()  # A1111 writes it only where given


@pytest.mark.parametrize("options, needle", [
    (dict(hires_scale=5), "hires fix: 256x256 x 5 is 1280x1280: unsupported size 1280x1280"),
    (dict(hires_scale=1.1), "is 281x281: unsupported size"),
    (dict(hires_scale=0.5), "the hires scale must be a number from 1 to 8"),
    (dict(hires_scale=2, denoising_strength=0.0), r"denoising strength must be a number in \(0, 1\]"),
    (dict(hires_scale=2, denoising_strength=1.5), r"denoising strength must be a number in \(0, 1\]"),
    (dict(hires_scale=2, hires_steps=-1), "hires steps must be a whole number >= 0"),
    (dict(hires_scale=2, hires_upscaler="bicubic"), "hires upscaler must be one of latent, .*lanczos, nearest"),
    (dict(hires_scale=2, hires_steps=400, denoising_strength=0.3), "need a schedule of 1333 steps"),
    (dict(hires_scale=2, hires_scheduler="lms"), "unknown hires scheduler 'lms'"),
    (dict(hires_scale=2, hires_guidance=float("nan")), "the hires guidance must be a finite number"),
])
def test_hires_options_are_checked_before_anything_runs(pipe, calls, options, needle):
    from pm_runtime.errors import UserError

    with pytest.raises(UserError, match=needle):
        pipe.generate(PROMPT, **KW, **options)
    assert calls == []



def test_image_upscalers_as_a1111_resizes_with_them():
    """A1111's images.resize_image (mode 0) with its Lanczos / Nearest upscalers: the upscaler's resize to
    int(side x scale), Lanczos to the multiple of 8 below, Lanczos to the target, each only where it differs."""
    from PIL import Image

    from pm_runtime.latent_upscale import a1111_pixels, upscale_image

    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    for mode, resample in (("lanczos", Image.LANCZOS), ("nearest", Image.NEAREST)):
        got = upscale_image(px, 48, 72, mode)  # x1.5: one resize
        assert np.array_equal(got, np.asarray(Image.fromarray(px).resize((72, 48), resample)))
        odd = upscale_image(px, 45, 67, mode)  # scale 1.40625: to 67x45, 64x40 (// 8 * 8), then 67x45 again
        want = Image.fromarray(px).resize((67, 45), resample).resize((64, 40), Image.LANCZOS).resize((67, 45),
                                                                                                    Image.LANCZOS)
        assert np.array_equal(odd, np.asarray(want))
    assert np.array_equal(upscale_image(px, 32, 48, "nearest"), px)  # scale 1: untouched
    x = np.array([[[[-1.0, 1.0, 0.0, 0.999, -2.0]]]], np.float32).repeat(3, axis=1)
    assert a1111_pixels(x)[0, 0, :, 0].tolist() == [0, 255, 127, 254, 0]  # 255 x clip((x + 1) / 2), truncated


def test_the_hires_pass_with_an_image_upscaler_encodes_the_resized_image(pipe, calls):
    """--hires-upscaler lanczos: the first pass is decoded, made uint8 as A1111 makes it, resized, encoded by
    the VAE encoder, and the second pass starts from those latents noised to its first step."""
    import pm_runtime.schedulers as S
    from pm_runtime import noise
    from pm_runtime.init_image import encoder_input
    from pm_runtime.latent_upscale import a1111_pixels, upscale_image
    from pm_runtime.specs import UNET, VAE_DECODER, VAE_ENCODER

    g = pipe.generate(PROMPT, **KW, **dict(HIRES, hires_upscaler="lanczos"))
    names = [name for name, *_ in calls]
    assert names.count(VAE_DECODER) == 2 and names.count(VAE_ENCODER) == 1
    assert names.index(VAE_ENCODER) > names.index(VAE_DECODER)  # the first pass's image, then the encoder
    first = [o["image"] for name, _, o in calls if name == VAE_DECODER][0]
    big = upscale_image(a1111_pixels(first)[0], 384, 384, "lanczos")
    enc_in, enc_out = [(i, o) for name, i, o in calls if name == VAE_ENCODER][0]
    np.testing.assert_array_equal(enc_in["image"], encoder_input(big))
    tables = S.slice_tables(S.make_tables("dpmpp-2m", pipe.bundle.scheduler_config, 6), 3)
    eps = noise.initial_latents(5, enc_out["latent"].shape, pass_=1)
    expect = S.start_latents(enc_out["latent"], eps, tables) * np.float32(tables.input_scale[0])
    unets = [i for name, i, _ in calls if name == UNET]
    np.testing.assert_allclose(unets[4]["sample"], np.concatenate([expect, expect]), rtol=1e-6, atol=1e-6)
    assert g.images.shape == (1, 384, 384, 3) and "Hires upscaler: Lanczos" in g.parameters()
    assert g.timings["vae_calls"] == 2 and g.timings["vae_encoder_s"] > 0


def test_prompt_editing_counts_on_into_the_hires_pass(pipe, calls):
    """A1111's prompt editing in the hires pass: a fraction counts the whole run (0.5: the first pass's
    middle, so the second pass reads the later text all through; 1.5: the second pass's middle). What the
    text encoder gets in the second pass: the rows of a hires run of the later text alone, or both texts."""
    from pm_runtime.specs import TEXT_ENCODER

    def second_pass_ids(prompt):
        calls.clear()
        pipe.generate(prompt, **KW, **HIRES)
        te = [i["input_ids"] for name, i, _ in calls if name == TEXT_ENCODER]
        assert len(te) == 2  # one call per pass
        return te[1]

    plain = second_pass_ids("a photo of <persona> as a wizard")
    np.testing.assert_array_equal(second_pass_ids("a photo of <persona> as a [knight:wizard:0.5]"), plain)
    both = second_pass_ids("a photo of <persona> as a [knight:wizard:1.5]")
    assert len(both) > len(plain) and {tuple(r) for r in plain} < {tuple(r) for r in both}


def test_the_hires_pass_takes_its_own_scheduler_and_guidance(pipe, calls):
    """hires_scheduler: the second pass's schedule and steps are that scheduler's (its first pass's are the
    main one's); hires_guidance: a guidance of its own (equal to the main one: the same image); both recorded
    as A1111 writes them (the sampler and schedule type both, where the scheduler differs)."""
    import pm_runtime.schedulers as S
    from pm_runtime.specs import UNET

    g = pipe.generate(PROMPT, **KW, **HIRES, hires_scheduler="euler-a-karras")
    steps = [float(i["timestep"][0]) for name, i, _ in calls if name == UNET]
    first = S.make_tables("dpmpp-2m", pipe.bundle.scheduler_config, 4).timesteps
    second = S.make_tables("euler-a-karras", pipe.bundle.scheduler_config, 6).timesteps[3:]
    np.testing.assert_allclose(steps, [*first, *second], rtol=1e-6)
    assert "Hires sampler: Euler a, Hires schedule type: Karras" in g.parameters()
    plain = pipe.generate(PROMPT, **KW, **HIRES)
    same = pipe.generate(PROMPT, **KW, **HIRES, hires_guidance=8.0)  # the main guidance
    other = pipe.generate(PROMPT, **KW, **HIRES, hires_guidance=3.0)
    assert np.array_equal(same.images, plain.images) and not np.array_equal(other.images, plain.images)
    assert "Hires CFG Scale: 3.0" in other.parameters() and "Hires CFG" not in same.parameters()
    karras = pipe.generate(PROMPT, **dict(KW, scheduler="dpmpp-2m-beta"), **HIRES, hires_scheduler="dpmpp-2m")
    assert "Hires sampler: DPM++ 2M, Hires schedule type: Uniform" in karras.parameters()

"""img2img (AUTOMATIC1111's img2img tab): the bundle's VAE encoder against diffusers', the init image's
preparation, the pass's start (A1111's step arithmetic, the seed's noise on the image's latents), its
records, and pm-run --init-image. The schedule's tail against diffusers is test_schedulers'
test_a_pass_from_a_later_step_matches_diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pm_runtime.errors import UserError

PROMPT = "a photo of <persona> as a knight"
KW = dict(seed=5, steps=4)


def _photo(w=256, h=256, seed=0) -> np.ndarray:
    """A smooth RGB picture with some noise (structure for the VAE)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + rng.random((h, w, 3)) * 55
    return base.astype(np.uint8)


@pytest.fixture(scope="module")
def pipe(run_bundle):
    from pm_runtime.pipeline import Pipeline

    return Pipeline.load(run_bundle, backend="onnxruntime", concept="alice")


# ---------------------------------------------------------------- the step arithmetic
@pytest.mark.parametrize("steps", [1, 4, 20, 50, 999])
@pytest.mark.parametrize("strength", [0.01, 0.3, 0.5, 0.75, 0.999, 1.0])
def test_img2img_start_is_a1111s(steps, strength):
    """A1111's img2img (modules/sd_samplers_kdiffusion.py, setup_img2img_steps without 'fix steps'):
    t_enc = int(min(strength, 0.999) * steps), sigma_sched = sigmas[steps - t_enc - 1:]: t_enc + 1 steps."""
    from pm_runtime.schedulers import img2img_start

    t_enc = int(min(strength, 0.999) * steps)
    first, noised = img2img_start(steps, strength, "dpmpp-2m")
    assert first == noised == steps - t_enc - 1 and 0 <= first < steps
    assert steps - first == t_enc + 1  # steps run
    if strength == 1.0:
        assert first == 0  # the whole schedule, as text-to-image
    # A1111's DDIM (modules/sd_samplers_timesteps.py): timesteps[:t_enc] run, the image noised at timesteps[t_enc],
    # i.e. t_enc steps from steps - t_enc, noised one step before it (at least one step)
    first, noised = img2img_start(steps, strength, "ddim")
    assert steps - first == max(t_enc, 1) and noised == max(first - 1, 0)


def test_img2img_start_refuses_a_strength_outside_0_1():
    from pm_runtime.schedulers import img2img_start

    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="denoising strength"):
            img2img_start(20, bad)


# ---------------------------------------------------------------- the init image
def test_init_image_is_prepared_as_a1111_and_diffusers_do(tmp_path):
    """Pixels / 255 * 2 - 1 (diffusers' VaeImageProcessor, the same float32 numbers), 'Just resize' with
    Lanczos, transparency flattened onto white, EXIF orientation applied."""
    from diffusers.image_processor import VaeImageProcessor

    from pm_runtime.init_image import load_init_image

    a = _photo(96, 64)
    init = load_init_image(a)
    assert init.source_size == (96, 64) and not init.resized and init.name == "<array>"
    ref = VaeImageProcessor(do_resize=False).preprocess(Image.fromarray(a)).numpy()
    np.testing.assert_array_equal(init.encoder_input(), ref)
    big = load_init_image(a, width=128, height=128)
    assert big.resized and big.source_size == (96, 64)
    np.testing.assert_array_equal(big.pixels, np.asarray(Image.fromarray(a).resize((128, 128), Image.LANCZOS)))
    # RGBA: flattened onto white (a fully transparent pixel is white, an opaque one itself)
    rgba = np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 128
    flat = load_init_image(rgba).pixels
    assert tuple(flat[0, 0]) == (255, 255, 255) and np.array_equal(flat[1:], a[1:])
    assert np.allclose(flat[0, 1].astype(int), (a[0, 1].astype(int) * 128 + 255 * 127) / 255, atol=1)
    # a file with an EXIF orientation (6: rotate 90 degrees clockwise to display): read upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = load_init_image(tmp_path / "phone.jpg")
    assert upright.source_size == (64, 96) and upright.name == "phone.jpg"


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "I;16", "1"])
def test_init_images_of_every_pillow_mode_become_rgb(mode):
    from pm_runtime.init_image import load_init_image

    a = _photo(96, 64)
    image = Image.fromarray(a[..., 0].astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(a).convert(mode)
    got = load_init_image(image)
    assert got.pixels.shape == (64, 96, 3) and got.pixels.dtype == np.uint8 and got.name == "<PIL image>"
    if mode in ("L", "LA", "I;16"):  # grey: the three channels equal, 16 bits scaled (not clipped) to 8
        grey = a[..., 0] if mode == "I;16" else np.asarray(Image.fromarray(a).convert("L"))
        assert all(np.array_equal(got.pixels[..., c], grey) for c in range(3))


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, monkeypatch):
    from pm_runtime.init_image import load_init_image

    Image.fromarray(_photo(64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: Pillow raises
    with pytest.raises(UserError, match="too large to read safely"):
        load_init_image(tmp_path / "big.png")


@pytest.mark.parametrize("source, needle", [
    ("missing.png", "init image not found"),
    ("not-an-image.png", "cannot read init image"),
    (np.zeros((8, 8, 3), np.float32), "must be uint8"),
    (3, "a file path, a PIL image or a uint8 array"),
])
def test_init_image_errors_are_one_line(tmp_path, source, needle):
    from pm_runtime.init_image import load_init_image

    (tmp_path / "not-an-image.png").write_text("hello")
    if isinstance(source, str):
        source = tmp_path / source
    with pytest.raises(UserError, match=needle):
        load_init_image(source)


# ---------------------------------------------------------------- the bundle's VAE encoder
def test_the_bundle_ships_a_vae_encoder_that_encodes_as_diffusers(pipe, tiny_model):
    """pm-export writes the encoder half as an optional component (fp32 ONNX, validated; fp16 torch
    weights); onnxruntime's latents are diffusers' encode(x).latent_dist.mode() x scaling_factor."""
    import torch
    from diffusers import AutoencoderKL

    from pm_runtime.init_image import load_init_image
    from pm_runtime.specs import VAE_ENCODER

    comps = {(c["network"], c["format"]): c for c in pipe.bundle.components if c["network"] == VAE_ENCODER}
    assert set(comps) == {(VAE_ENCODER, "onnx"), (VAE_ENCODER, "torch")}
    onnx = comps[VAE_ENCODER, "onnx"]
    assert onnx["precision"] == "fp32" and onnx["details"]["optional"] and onnx["validation"]
    assert all(v["passed"] for v in onnx["validation"])
    x = load_init_image(_photo(256, 192)).encoder_input()
    with pipe.backend.network(VAE_ENCODER) as enc:
        got = enc.run({"image": x})["latent"]
    vae = AutoencoderKL.from_pretrained(tiny_model / "vae").eval()
    with torch.no_grad():
        ref = (vae.encode(torch.from_numpy(x)).latent_dist.mode() * vae.config.scaling_factor).numpy()
    assert got.shape == ref.shape == (1, 4, 24, 32)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the pipeline
def test_img2img_denoises_the_noised_image_latents(pipe, calls):
    """The encoder reads the image once; the loop starts at step steps - t_enc - 1 of the whole schedule
    with the image's latents noised there by the seed's noise (the text-to-image start noise), runs the
    rest of the schedule with its stage contexts, and the image records A1111's img2img fields."""
    import pm_runtime.schedulers as S
    from pm_runtime import noise
    from pm_runtime.specs import UNET, VAE_ENCODER

    photo = _photo()
    g = pipe.generate(PROMPT, **KW, init_image=photo, denoising_strength=0.5)  # t_enc = 2: 3 steps from step 1
    encs = [(i, o) for name, i, o in calls if name == VAE_ENCODER]
    unets = [i for name, i, _ in calls if name == UNET]
    assert len(encs) == 1 and len(unets) == 3
    assert g.images.shape == (1, 256, 256, 3) and g.settings.height == g.settings.width == 256
    im = g.settings.img2img
    assert (im.denoising_strength, im.start, im.source, im.source_size) == (0.5, 1, "<array>", (256, 256))
    full = S.make_tables("dpmpp-2m", pipe.bundle.scheduler_config, 4)
    np.testing.assert_array_equal(g.timesteps, full.timesteps[1:])
    assert [float(u["timestep"][0]) for u in unets] == [float(t) for t in full.timesteps[1:]]
    tables = S.slice_tables(full, 1)
    x0 = encs[0][1]["latent"]
    eps = noise.initial_latents(5, x0.shape)
    expect = S.start_latents(x0, eps, tables) * np.float32(tables.input_scale[0])
    np.testing.assert_allclose(unets[0]["sample"], np.concatenate([expect, expect]), rtol=1e-6, atol=1e-6)
    assert len(g.plan) == 3
    text = g.parameters()
    assert "Steps: 4," in text and "Denoising strength: 0.5" in text and "Size: 256x256" in text
    assert "Hires" not in text
    assert json.loads(json.dumps(g.summary()))["settings"]["img2img"]["start"] == 1


def test_ddim_img2img_is_a1111s_ddim(pipe, calls):
    """DDIM: t_enc steps from step steps - t_enc, the image noised to the level of the step before (A1111's
    DDIM img2img noises at alphas_cumprod[timesteps[t_enc]] and runs timesteps[:t_enc])."""
    import pm_runtime.schedulers as S
    from pm_runtime import noise
    from pm_runtime.schedulers.common import alphas_cumprod
    from pm_runtime.specs import UNET, VAE_ENCODER

    g = pipe.generate(PROMPT, **KW, scheduler="ddim", init_image=_photo(), denoising_strength=0.5)
    unets = [i for name, i, _ in calls if name == UNET]
    full = S.make_tables("ddim", pipe.bundle.scheduler_config, 4)
    assert len(unets) == 2 and g.settings.img2img.start == 2  # t_enc = 2
    assert [float(u["timestep"][0]) for u in unets] == [float(t) for t in full.timesteps[2:]]
    x0 = [o for name, _, o in calls if name == VAE_ENCODER][0]["latent"]
    eps = noise.initial_latents(5, x0.shape)
    a = float(alphas_cumprod(pipe.bundle.scheduler_config)[int(full.timesteps[1])])  # the step before the first
    expect = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    np.testing.assert_allclose(unets[0]["sample"], np.concatenate([expect, expect]), rtol=1e-5, atol=1e-5)


def test_img2img_strength_1_is_the_whole_schedule_from_the_image(pipe, calls):
    g = pipe.generate(PROMPT, **KW, init_image=_photo(), denoising_strength=1.0)
    assert g.settings.img2img.start == 0 and len([1 for name, *_ in calls if name == "unet"]) == 4
    # the default strength is A1111's 0.75: int(0.75 * 4) = 3, so 4 steps from step 0
    calls.clear()
    g = pipe.generate(PROMPT, **KW, init_image=_photo())
    assert g.settings.img2img.denoising_strength == 0.75 and g.settings.img2img.start == 0


def test_img2img_batches_share_the_image_not_the_noise(pipe):
    one = pipe.generate(PROMPT, **KW, init_image=_photo(), denoising_strength=0.5, num_images=2)
    assert one.images.shape == (2, 256, 256, 3) and not np.array_equal(one.images[0], one.images[1])
    again = pipe.generate(PROMPT, **KW, init_image=_photo(), denoising_strength=0.5, num_images=2)
    np.testing.assert_array_equal(one.images, again.images)
    other = pipe.generate(PROMPT, seed=6, steps=4, init_image=_photo(), denoising_strength=0.5)
    assert not np.array_equal(other.images[0], one.images[0])


def test_img2img_prompt_editing_counts_as_a1111s_img2img(pipe, calls):
    """A1111 schedules the prompt over the whole --steps and its denoiser counts the pass's steps from 0."""
    g = pipe.generate("a photo of [cat:<persona>:0.25] as a knight", **KW, init_image=_photo(),
                      denoising_strength=0.5)
    # over 4 steps 'cat' for steps 1-2, the concept for 3-4; the pass (3 steps) reads steps 1-3. Scheduled over
    # the pass's own 3 steps, or read at the schedule's last 3, it would be cat once, then the concept twice.
    assert [(s["steps"], "cat" in s["text"]) for s in g.prompt_schedule()] == [([1, 2], True), ([3, 3], False)]


def test_img2img_sizes_resize_and_refusals(pipe, run_bundle):
    g = pipe.generate(PROMPT, seed=5, steps=2, init_image=_photo(300, 200), width=320, height=256,
                      denoising_strength=0.5)
    assert g.images.shape == (1, 256, 320, 3) and g.settings.img2img.source_size == (300, 200)
    with pytest.raises(UserError, match=r"init image <array> is 300x200: .*give --width and --height"):
        pipe.generate(PROMPT, seed=5, steps=2, init_image=_photo(300, 200))
    with pytest.raises(UserError, match="not go together"):
        pipe.generate(PROMPT, seed=5, steps=2, init_image=_photo(), hires_scale=1.5)
    with pytest.raises(UserError, match="init image or initial latents, not both"):
        pipe.generate(PROMPT, steps=2, init_image=_photo(), latents=np.zeros((1, 4, 32, 32), np.float32))
    with pytest.raises(UserError, match=r"denoising strength must be a number in \(0, 1\]"):
        pipe.generate(PROMPT, seed=5, steps=2, init_image=_photo(), denoising_strength=1.5)


def test_a_bundle_without_a_vae_encoder_says_so(run_bundle, tmp_path, monkeypatch):
    from pm_runtime.pipeline import Pipeline
    from pm_runtime.specs import VAE_ENCODER

    p = Pipeline.load(run_bundle, backend="onnxruntime", concept="alice")
    provides = type(p.backend).provides
    monkeypatch.setattr(type(p.backend), "provides", lambda self, n: n != VAE_ENCODER and provides(self, n))
    with pytest.raises(UserError, match="img2img needs a VAE encoder.*has none for the onnxruntime backend"):
        p.generate(PROMPT, seed=5, steps=2, init_image=_photo())
    with pytest.raises(UserError, match="the hires upscaler lanczos .* needs a VAE encoder.*has none for the onnx"):
        p.generate(PROMPT, seed=5, steps=2, height=256, width=256, hires_scale=1.5, hires_upscaler="lanczos")


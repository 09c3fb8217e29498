"""Loading a local Stable Diffusion 1.x/2.x diffusers folder (and a CLIP image encoder), with
one-line errors for folders that are not what they claim to be."""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..fingerprint import fingerprint
from .text_encoder import clip_parts

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}


@contextlib.contextmanager
def quiet_hf():
    """Silence transformers/diffusers progress bars and info warnings for the duration of a load."""
    import diffusers
    import transformers

    t_level, d_level = transformers.logging.get_verbosity(), diffusers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(t_level)
        diffusers.logging.set_verbosity(d_level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def check_sd_layout(model_dir: Path) -> None:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model folder not found: {model_dir}")
    missing = [p for p in SD_PARTS if not (model_dir / p / _CONFIG_FILES[p]).is_file()]
    if missing:
        raise UserError(
            f"{model_dir} is not a Stable Diffusion diffusers folder: missing "
            + ", ".join(f"{p}/{_CONFIG_FILES[p]}" for p in missing)
        )


def read_scheduler_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())


@dataclass
class BaseModel:
    model_dir: Path
    tokenizer: object  # transformers CLIPTokenizer
    text_encoder: torch.nn.Module  # CLIPTextModel
    unet: torch.nn.Module | None
    vae: torch.nn.Module | None
    scheduler_config: dict
    fingerprint: str
    safety_checker: torch.nn.Module | None = None  # StableDiffusionSafetyChecker, when asked for and present
    checker_settings: dict | None = None  # its CLIP preprocessing (pm_runtime.safety), from feature_extractor/

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)


def model_fingerprint(text_encoder: torch.nn.Module, unet_config: dict) -> str:
    """Fingerprint of a loaded model; call before any placeholder token is added."""
    table = clip_parts(text_encoder)[0].token_embedding.weight.detach().float().cpu().numpy()
    return fingerprint(text_encoder.config.to_dict(), table, dict(unet_config))


def has_safety_checker(model_dir: Path) -> bool:
    return (Path(model_dir) / "safety_checker" / "config.json").is_file()


def load_safety_checker(model_dir: Path) -> tuple[torch.nn.Module, dict]:
    """(StableDiffusionSafetyChecker in float32, its preprocessing settings) from a model folder."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from ..safety import DEFAULTS, settings_from_processor_config

    model_dir = Path(model_dir)
    try:
        with quiet_hf():
            checker = StableDiffusionSafetyChecker.from_pretrained(model_dir / "safety_checker", local_files_only=True,
                                                                   torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"could not load the safety checker in {model_dir}: {str(e).splitlines()[0]}") from e
    cfg = model_dir / "feature_extractor" / "preprocessor_config.json"
    settings = settings_from_processor_config(json.loads(cfg.read_text())) if cfg.is_file() else dict(DEFAULTS)
    return checker.requires_grad_(False).eval(), settings


def load_base_model(model_dir: Path, *, device: str | torch.device = "cpu", with_unet: bool = True,
                    with_vae: bool = True, with_safety_checker: bool = False) -> BaseModel:
    """Load tokenizer, text encoder, UNet and VAE (and the safety checker when asked for and
    present) in float32 (callers cast), frozen, eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_dir = Path(model_dir)
    check_sd_layout(model_dir)
    try:
        with quiet_hf():
            tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
            text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", local_files_only=True,
                                                         torch_dtype=torch.float32)
            unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
            unet = (UNet2DConditionModel.from_pretrained(model_dir / "unet", local_files_only=True,
                                                         torch_dtype=torch.float32) if with_unet else None)
            vae = (AutoencoderKL.from_pretrained(model_dir / "vae", local_files_only=True,
                                                 torch_dtype=torch.float32) if with_vae else None)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"could not load the model in {model_dir}: {str(e).splitlines()[0]}") from e
    fp = model_fingerprint(text_encoder, unet_config)
    for m in (text_encoder, unet, vae):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    checker, settings = (load_safety_checker(model_dir) if with_safety_checker and has_safety_checker(model_dir)
                         else (None, None))
    if checker is not None:
        checker.to(device)
    return BaseModel(model_dir, tokenizer, text_encoder, unet, vae, read_scheduler_config(model_dir), fp, checker,
                     settings)


def find_image_encoder(model_dir: Path, image_encoder_dir: Path | None) -> Path:
    if image_encoder_dir is not None:
        path = Path(image_encoder_dir)
        if not (path / "config.json").is_file():
            raise UserError(f"--image-encoder {path} is not a CLIP model folder (no config.json)")
        return path
    path = Path(model_dir) / "image_encoder"
    if not (path / "config.json").is_file():
        raise UserError(
            f"no image encoder: {model_dir} has no image_encoder/ folder; pass --image-encoder DIR "
            "(a local CLIP ViT-B/32 model folder, e.g. a copy of openai/clip-vit-base-patch32)"
        )
    return path


def load_image_encoder(path: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """CLIPVisionModelWithProjection from a vision-only or a full CLIP folder, float32, frozen."""
    from transformers import CLIPVisionModelWithProjection

    try:
        with quiet_hf():
            model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True,
                                                                  torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"could not load the image encoder in {path}: {str(e).splitlines()[0]}") from e
    return model.requires_grad_(False).eval().to(device)


@dataclass(frozen=True)
class Placeholders:
    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    super_class: str
    super_id: int


def placeholder_names(num_tokens: int) -> tuple[str, ...]:
    return tuple(f"<pm-concept-{i + 1}>" for i in range(num_tokens))


def super_class_id(tokenizer, super_class: str) -> int:
    ids = tokenizer.encode(super_class, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(
            f"the super-class {super_class!r} is {len(ids)} tokens for this tokenizer; it must be exactly one "
            "(e.g. 'face', 'man', 'woman')"
        )
    return int(ids[0])


def add_placeholder_tokens(base: BaseModel, super_class: str, num_tokens: int) -> Placeholders:
    """Add K placeholder tokens to the tokenizer; their (never used) embedding rows start at e_super."""
    if num_tokens < 1:
        raise UserError(f"--num-tokens must be >= 1, got {num_tokens}")
    sid = super_class_id(base.tokenizer, super_class)
    names = placeholder_names(num_tokens)
    clash = [n for n in names if n in base.tokenizer.get_vocab()]
    if clash:
        raise UserError(f"the tokenizer already holds {clash[0]}; was this model folder modified?")
    base.tokenizer.add_tokens(list(names))
    ids = tuple(int(i) for i in base.tokenizer.convert_tokens_to_ids(list(names)))
    rows = clip_parts(base.text_encoder)[0].token_embedding.weight.shape[0]
    if max(ids) >= rows:  # grow only: a table larger than the tokenizer keeps its rows
        base.text_encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    emb = clip_parts(base.text_encoder)[0].token_embedding.weight
    with torch.no_grad():
        emb[list(ids)] = emb[sid].clone()
    return Placeholders(names, ids, super_class, sid)

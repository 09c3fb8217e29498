"""Every format name, version and key of the project's files, in one place (GGUF-style).

A version changes only when the structure changes. Readers refuse other format names and
newer versions with a clear message.
"""

CONCEPT_FORMAT = "personamagic-concept"
CONCEPT_VERSION = 1

# Top-level keys of concept.pt (a dict loadable with torch.load(weights_only=True)).
K_FORMAT = "format"
K_VERSION = "version"
K_MAPPER_STATE = "mapper_state"  # dict[str, Tensor]
K_MAPPER_CONFIG = "mapper_config"  # MapperConfig as a dict
K_TOKENS = "tokens"  # concept word, super-class word and id, placeholder tokens
K_SUPER_EMBEDDING = "super_embedding"  # (D,) input embedding of the super-class token
K_IMAGES = "images"  # list of {name, sha256, embedding (I,)}
K_REFERENCE = "reference"  # {name, sha256, embedding (I,)}: the photo baked into tables
K_FINGERPRINT = "fingerprint"  # base-model fingerprint (pm_runtime.fingerprint)
K_BASE_MODEL = "base_model"  # facts about the base model: prediction type, widths
K_TRAINING = "training"  # training settings, steps done, final loss, loss history, time
K_TRAIN_STATE = "train_state"  # optimizer + every RNG state, for bit-exact resume

# ---------------------------------------------------------------- concept table (numpy only)
# concepts/NAME.safetensors: the mapper baked for one reference photo (DESIGN §2).
TABLE_FORMAT = "personamagic-concept-table"
TABLE_VERSION = 1
TABLE_SUFFIX = ".safetensors"
# Tensors (float32): row i holds t = stage_lo + i, for every integer t in [stage_lo, stage_hi].
T_TOKEN_EMBEDS = "E"  # (T, K, D) E[t]: placeholder input embeddings
T_BYPASS = "B"  # (T, K, D) B[t]: bypass vectors added after the last text-encoder layer
# safetensors metadata (str -> str; lists as JSON).
TM_FORMAT = "format"
TM_VERSION = "version"
TM_CONCEPT_WORD = "concept_word"
TM_SUPER_CLASS = "super_class"
TM_PLACEHOLDERS = "placeholder_tokens"  # JSON list of K token strings
TM_NUM_TOKENS = "num_tokens"
TM_DIM = "dim"
TM_STAGE_LO = "stage_lo"
TM_STAGE_HI = "stage_hi"
TM_FINGERPRINT = "fingerprint"
TM_REFERENCE_NAME = "reference_name"
TM_REFERENCE_SHA256 = "reference_sha256"
TM_SOURCE_SHA256 = "source_sha256"  # sha256 of the concept.pt it was baked from

# ---------------------------------------------------------------- bundle (bundle.json)
BUNDLE_FORMAT = "personamagic-bundle"
BUNDLE_VERSION = 1
BUNDLE_MANIFEST = "bundle.json"
BUNDLE_TOKENIZER_DIR = "tokenizer"
BUNDLE_CONCEPTS_DIR = "concepts"
# Top-level keys.
BK_FORMAT = "format"
BK_VERSION = "version"
BK_FINGERPRINT = "fingerprint"
BK_BASE_MODEL = "base_model"  # text_dim, max_length, vocab_size, latent_channels, vae_scale_factor, ...
BK_COMPONENTS = "components"  # list of component entries (below)
BK_SCHEDULER = "scheduler_config"  # the model's scheduler_config.json, verbatim
BK_TOKENIZER = "tokenizer"  # {"files": [{file, sha256}]}
BK_CONCEPTS = "concepts"  # list of concept entries (below)
BK_TOOLS = "tools"  # versions of the tools that wrote the bundle
BK_CREATED = "created"  # UTC ISO time
# Component entry keys.
CK_NAME = "name"  # unique in the bundle, e.g. "unet" or "unet.plan"
CK_NETWORK = "network"  # spec name: text_encoder | unet | vae_decoder
CK_FORMAT = "format"  # onnx | tensorrt
CK_FILE = "file"  # path relative to the bundle folder
CK_SHA256 = "sha256"
CK_DATA_FILES = "data_files"  # ONNX external data: [{file, sha256}]
CK_PRECISION = "precision"  # fp32 | fp16 | int8 (--int8: unet, --int8-vae: vae_decoder); graph IO stays float32
CK_INPUTS = "inputs"  # from the spec: [{name, dtype, shape}] (shape entries: int or axis name)
CK_OUTPUTS = "outputs"
CK_AXES = "axes"  # named dynamic axes: {name: {min, opt, max, multiple_of}}
CK_VALIDATION = "validation"  # [{shapes, max_abs, max_rel, tolerance; int8-vae: psnr_db, psnr_min_db}] vs PyTorch
CK_DETAILS = "details"  # format-specific facts (fp32 op list, TensorRT version, GPU, opset)
# Shared {file, sha256} keys.
FK_FILE = "file"
FK_SHA256 = "sha256"
# Concept entry keys (besides FK_FILE / FK_SHA256).
QK_NAME = "name"
QK_CONCEPT_WORD = "concept_word"
QK_STAGE = "stage"  # [lo, hi]: this concept's table rows
QK_NUM_TOKENS = "num_tokens"
CK_DERIVED_AXES = "derived_axes"  # {axis: {axis, factor}}: e.g. image_height = 8 x latent_height
BK_TOKENIZER_FILES = "files"  # inside BK_TOKENIZER: [{file, sha256}]
# Base-model keys besides pm_runtime.specs.ModelDims' fields.
BM_PREDICTION_TYPE = "prediction_type"  # epsilon | v_prediction
BM_VAE_SCALING_FACTOR = "vae_scaling_factor"
BM_VAE_DECODER_APPLIES_SCALING = "vae_decoder_applies_scaling"  # true: feed the scheduler's latent as is
BM_MODEL_FOLDER = "model_folder"  # the model folder's name (not its path)
BM_SAFETY_CHECKER = "safety_checker"  # "exported" (an optional safety_checker component) | "none in the model folder"

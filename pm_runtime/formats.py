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

"""Model families: each module maps one Hugging Face architecture to specmoe's
ModelConfig (`parse_config`) and its tensors to specmoe parameters (`weight_specs`)."""

from types import ModuleType

from . import deepseek_v3, llama, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe

FAMILIES: tuple[ModuleType, ...] = (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, llama, qwen2, qwen3)
BY_ARCHITECTURE = {a: f for f in FAMILIES for a in f.ARCHITECTURES}
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.MODEL_TYPES}

"""Load a local Hugging Face checkpoint directory into a CausalLM.

A directory holds config.json, one model.safetensors or several shards listed
in model.safetensors.index.json, and optionally generation_config.json and
tokenizer.json. Every problem is reported with the file, tensor, shape or
architecture it concerns.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ConfigError, ModelConfig
from .families import BY_ARCHITECTURE, BY_MODEL_TYPE
from .model import CausalLM

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


BUNDLED = Path(__file__).resolve().parent / "bundled"   # tiny-moe and tiny-draft, trained by scripts/train_tiny.py


def bundled_model(name: str = "tiny-moe") -> Path:
    """The directory of a checkpoint shipped with specmoe ("tiny-moe", "tiny-draft")."""
    path = BUNDLED / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"bundled model {name!r} not found at {path}; "
                                f"build it with scripts/train_tiny.py --out {BUNDLED}")
    return path


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded; the message names what is wrong."""


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    hf_config: dict
    eos_token_ids: tuple[int, ...]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: a checkpoint directory needs config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Parse config.json (and generation_config.json) without loading tensors."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    hf = _read_json(path / "config.json")
    archs = hf.get("architectures") or []
    family = next((BY_ARCHITECTURE[a] for a in archs if a in BY_ARCHITECTURE), None) \
        or BY_MODEL_TYPE.get(hf.get("model_type"))
    if family is None:
        raise CheckpointError(
            f"{path}: unsupported architecture {archs or None} (model_type {hf.get('model_type')!r}); supported: "
            + ", ".join(sorted(BY_ARCHITECTURE)))
    try:
        cfg = family.parse_config(hf)
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    eos = cfg.eos_token_ids
    gen = path / "generation_config.json"
    if gen.exists():
        g = _read_json(gen).get("eos_token_id")
        if g is not None:
            eos = tuple(g) if isinstance(g, list) else (int(g),)
    return Checkpoint(path=path, config=cfg, hf_config=hf, eos_token_ids=eos)


class _TensorIndex:
    """Tensor name -> shard file, opening shards lazily."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            wm = _read_json(index).get("weight_map")
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index} has no weight_map object")
            self.where = {k: path / v for k, v in wm.items()}
            for f in set(self.where.values()):
                if not f.exists():
                    raise CheckpointError(f"{index} lists shard {f.name}, which is missing")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files")
            self.where = {}
            for f in files:
                with safe_open(f, framework="pt") as h:
                    self.where.update({k: f for k in h.keys()})
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor | None:
        f = self.where.get(name)
        if f is None:
            return None
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        try:
            return self._open[f].get_tensor(name)
        except Exception as e:  # a weight_map entry the shard lacks
            raise CheckpointError(f"tensor {name}: cannot be read from {f.name}: {e}") from None


def _fill(dst: torch.Tensor, parts: list, idx: _TensorIndex, param: str) -> set[str]:
    """Copy the concatenation of `parts` into dst (rows along dim 0); returns the names used."""
    used, row = set(), 0
    for name, shape in parts:
        t = idx.get(name)
        if t is None:
            raise CheckpointError(f"missing tensor {name} (for {param}, expected shape {tuple(shape)})")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        n = shape[0] if shape else 1
        dst[row:row + n].copy_(t)
        row += n
        used.add(name)
    if row != dst.shape[0]:
        raise CheckpointError(f"{param}: parts fill {row} rows of {dst.shape[0]}")
    return used


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
               max_positions: int = 4096, dispatcher=None, experts: list[int] | None = None
               ) -> tuple[CausalLM, Checkpoint]:
    """Build the model for the checkpoint at `path` and load every weight; with
    `experts` (global ids), only those routed experts are built and read."""
    ckpt = read_checkpoint(path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    family = BY_ARCHITECTURE.get(ckpt.config.architecture)
    model = CausalLM(ckpt.config, dtype=dtype, device=device, max_positions=max_positions, dispatcher=dispatcher,
                     experts=experts)
    params = model.named_weights()
    specs = family.weight_specs(ckpt.config)
    unknown = set(specs) - set(params)
    unset = set(params) - set(specs)
    if unknown or unset:  # a family/model mismatch: a bug here, not in the checkpoint
        raise RuntimeError(f"{family.__name__}: specs without parameter {sorted(unknown)[:5]}, "
                           f"parameters without spec {sorted(unset)[:5]}")
    idx = _TensorIndex(ckpt.path)
    used: set[str] = set()
    with torch.no_grad():
        for pname, spec in specs.items():
            dst = params[pname]
            if spec and isinstance(spec[0], list):  # stacked experts
                held = model.experts   # all experts, or an expert-parallel shard
                if len(spec) != ckpt.config.moe.num_experts or len(held) != dst.shape[0]:
                    raise RuntimeError(f"{pname}: {len(spec)} experts in the spec, {len(held)} held, "
                                       f"{dst.shape[0]} rows")
                for row, e in enumerate(held):
                    used |= _fill(dst[row], spec[e], idx, f"{pname}[{e}]")
            else:
                used |= _fill(dst, spec, idx, pname)
    extra = set(idx.where) - used
    if extra:
        log.info("%s: %d checkpoint tensors not used by specmoe (e.g. %s)", ckpt.path, len(extra), sorted(extra)[0])
    model.eval()
    return model, ckpt

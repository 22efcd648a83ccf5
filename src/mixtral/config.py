"""Model settings: `ModelArgs`, read from a Hugging Face `config.json` or taken from a preset.

Two model types share one architecture:
- `mixtral`: every layer's feed-forward block is a sparse mixture of experts (MoE);
- `mistral`: the dense case, one SwiGLU MLP per layer (stored here as `n_experts = 0`).

Both the old top-level `rope_theta` key and transformers-5 `rope_parameters` are read. Unknown keys are
ignored; impossible values raise `MixtralError` saying which key is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import MixtralError

SUPPORTED_MODEL_TYPES = ("mixtral", "mistral")


@dataclass(frozen=True)
class ModelArgs:
    """Shape and hyper-parameters of a Mixtral (or dense Mistral) decoder."""

    dim: int = 4096  # D: model width (hidden_size)
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336  # I: width of one expert's (or the dense MLP's) SwiGLU
    n_experts: int = 8  # E; 0 means a dense MLP (model_type "mistral")
    top_k: int = 2  # K: experts per token
    vocab_size: int = 32000
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 32768
    sliding_window: int | None = None
    tie_embeddings: bool = False
    router_aux_loss_coef: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                    "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MixtralError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise MixtralError(f"config: num_attention_heads ({self.n_heads}) must be a multiple of "
                               f"num_key_value_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise MixtralError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_experts < 0:
            raise MixtralError(f"config: num_local_experts must be >= 0, got {self.n_experts}")
        if self.is_moe and not 1 <= self.top_k <= self.n_experts:
            raise MixtralError(f"config: num_experts_per_tok ({self.top_k}) must be between 1 and "
                               f"num_local_experts ({self.n_experts})")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise MixtralError(f"config: rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise MixtralError(f"config: rms_norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise MixtralError(f"config: sliding_window must be positive or null, got {self.sliding_window}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def model_type(self) -> str:
        return "mixtral" if self.is_moe else "mistral"

    def replace(self, **changes) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json <-> ModelArgs -------------------------------------------------

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """Build from the dict of a Hugging Face `config.json` (model_type `mixtral` or `mistral`)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MixtralError(f"config: unsupported model_type {model_type!r}; "
                               f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [key for key in required if key not in cfg]
        if missing:
            raise MixtralError(f"config: missing required key(s) {', '.join(missing)}")
        dim, n_heads = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if n_heads <= 0 or dim % n_heads:
                raise MixtralError(f"config: hidden_size ({dim}) must be divisible by num_attention_heads "
                                   f"({n_heads}) when head_dim is not given")
            head_dim = dim // n_heads
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 1e6 if model_type == "mixtral" else 1e4))
        rope_type = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type not in ("default", None):
            raise MixtralError(f"config: rope_type {rope_type!r} is not supported (only 'default')")
        is_moe = model_type == "mixtral"
        sliding = cfg.get("sliding_window")
        return cls(
            dim=dim,
            n_layers=_int(cfg, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=_int(cfg, "num_key_value_heads", n_heads),
            head_dim=_int({"head_dim": head_dim}, "head_dim"),
            hidden_dim=_int(cfg, "intermediate_size"),
            n_experts=_int(cfg, "num_local_experts", 8) if is_moe else 0,
            top_k=_int(cfg, "num_experts_per_tok", 2) if is_moe else 0,
            vocab_size=_int(cfg, "vocab_size"),
            rope_theta=_float(rope_theta, "rope_theta"),
            norm_eps=_float(cfg.get("rms_norm_eps", 1e-5), "rms_norm_eps"),
            max_seq_len=_int(cfg, "max_position_embeddings", 32768),
            sliding_window=None if sliding is None else _int(cfg, "sliding_window"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            router_aux_loss_coef=_float(cfg.get("router_aux_loss_coef", 0.02), "router_aux_loss_coef"),
            bos_token_id=_int(cfg, "bos_token_id", 1),
            eos_token_id=_first_int(cfg.get("eos_token_id", 2), "eos_token_id"),
        )

    def to_hf_config(self) -> dict:
        """The `config.json` dict transformers reads for this model (MixtralForCausalLM / MistralForCausalLM)."""
        cfg = {
            "architectures": ["MixtralForCausalLM" if self.is_moe else "MistralForCausalLM"],
            "model_type": self.model_type,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "bfloat16",
        }
        if self.is_moe:
            cfg.update(num_local_experts=self.n_experts, num_experts_per_tok=self.top_k,
                       router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False)
        return cfg


def load_config(path: str | Path) -> ModelArgs:
    """Read `ModelArgs` from a `config.json` file, a model directory containing one, or a GGUF file."""
    path = Path(path)
    from .gguf_file import hf_config, is_gguf

    if is_gguf(path):
        return ModelArgs.from_hf_config(hf_config(path))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MixtralError(f"config.json not found: {path}")
    if path.stat().st_size > 16 * 2**20:  # real ones are a few kB
        raise MixtralError(f"{path} is {path.stat().st_size:,} bytes: too large for a config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MixtralError(f"cannot read {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise MixtralError(f"{path} must hold a JSON object")
    return ModelArgs.from_hf_config(cfg)


def _int(cfg: dict, key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MixtralError(f"config: {key} must be an integer, got {value!r}")
    return value


def _first_int(value, key: str) -> int:
    if isinstance(value, list) and value:
        value = value[0]
    return _int({key: value}, key)


def _float(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MixtralError(f"config: {key} must be a number, got {value!r}")
    return float(value)


# ---- presets: the published configs, so sizes can be planned without downloading anything ----------

PRESETS: dict[str, ModelArgs] = {
    "mixtral-8x7b": ModelArgs(),
    "mixtral-8x22b": ModelArgs(dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, hidden_dim=16384,
                               vocab_size=32768, max_seq_len=65536),
}


def preset(name: str) -> ModelArgs:
    """The ModelArgs of a published model by short name (`mixtral-8x7b`, `mixtral-8x22b`)."""
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise MixtralError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]

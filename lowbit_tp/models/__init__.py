"""Pretrained models (registry) and their tensor-parallel sharding rules (adapters)."""

from lowbit_tp.models.adapters import (
    SUPPORTED_MODEL_TYPES,
    ArchitectureAdapter,
    ColumnShard,
    RowParallelLayer,
    TPGeometry,
    check_tp,
    even_heads_refusal,
    get_adapter,
    head_counts,
    head_counts_or_none,
    valid_tp_degrees,
)
from lowbit_tp.models.registry import (
    DEFAULT_MODEL,
    ModelInfo,
    list_models,
    load_model,
    load_tokenizer,
    sha256_of_files,
)

__all__ = [
    "DEFAULT_MODEL",
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureAdapter",
    "ColumnShard",
    "ModelInfo",
    "RowParallelLayer",
    "TPGeometry",
    "check_tp",
    "even_heads_refusal",
    "get_adapter",
    "head_counts",
    "head_counts_or_none",
    "list_models",
    "load_model",
    "load_tokenizer",
    "sha256_of_files",
    "valid_tp_degrees",
]

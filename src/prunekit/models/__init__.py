"""Architecture adapters, one small module per family."""

from prunekit.models import gemma3, gpt2, llama, opt, phi3  # noqa: F401  (each registers itself)
from prunekit.models.base import (
    ADAPTERS,
    Attention,
    Block,
    Mlp,
    ModelAdapter,
    adapter_for_config,
    get_adapter,
    heads_from_weights,
    is_conv1d,
    is_linear,
    linear_weight,
    parameter_counts,
    supported_families,
    tied_parameter_names,
)

__all__ = [
    "ADAPTERS",
    "Attention",
    "Block",
    "Mlp",
    "ModelAdapter",
    "adapter_for_config",
    "get_adapter",
    "heads_from_weights",
    "is_conv1d",
    "is_linear",
    "linear_weight",
    "parameter_counts",
    "supported_families",
    "tied_parameter_names",
]

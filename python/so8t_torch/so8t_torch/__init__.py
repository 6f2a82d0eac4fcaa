"""SO8T for PyTorch: the gates and heads of SO8T_SPEC.md on a transformers causal LM, as
forward hooks, with the spec's loss, reading and writing the `so8t` adapter format
(`so8t_adapter.safetensors` + `so8t_config.json`), so that a run can start in the Rust
`so8t`, train here on GPUs (DDP, FSDP) and go back for bake, export and serve."""

from .algebra import family_generators, skew, triality_maps
from .model import So8tModel
from .loss import Example, pet_lambda, pet_loss, so8t_loss

__all__ = ["So8tModel", "Example", "so8t_loss", "pet_loss", "pet_lambda", "skew", "triality_maps", "family_generators"]

"""What dcfx knows about each supported model class: its call signature and where it is cut.

The rest of dcfx sees a model through a ``ModelSpec`` (``spec``): how a call flattens into
named tensors and back (``calls``), and the up layers that define the skip branches (U-Nets) or the blocks a range cuts
(transformers, ``transformer``).
``registry`` picks the spec of a model: diffusers U-Nets by class, the latent-diffusion
``UNetModel`` (``ldm``) by structure. Nothing here knows FX.
"""

from dcfx.models.calls import unflatten
from dcfx.models.ldm import LdmSpec, is_ldm_unet
from dcfx.models.registry import register_layout, register_model, spec_for
from dcfx.models.spec import ModelOutput, ModelSpec, StoredSpec, UpLayer
from dcfx.models.transformer import BlockRange, TransformerSpec, is_transformer

__all__ = [
    "BlockRange",
    "LdmSpec",
    "ModelOutput",
    "ModelSpec",
    "StoredSpec",
    "TransformerSpec",
    "UpLayer",
    "is_ldm_unet",
    "is_transformer",
    "register_layout",
    "register_model",
    "spec_for",
    "unflatten",
]

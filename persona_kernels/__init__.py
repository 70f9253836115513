"""persona-kernels: many role-playing personas over one shared dense model.

Each persona is a few kilobytes of FFN channel-group mask over the shared weights;
:func:`masked_ffn` runs a batch of mixed personas in one call.
"""

from .bank import MaskBank, MaskBankError, ModelMismatchError, PersonaMask
from .layout import PackedFFN, pack_ffn, unpack_ffn
from .ops import BACKENDS, available_backends, masked_ffn, resolve_backend
from .reference import apply_input_gains, apply_output_bias, masked_ffn_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "MaskBank",
    "MaskBankError",
    "ModelMismatchError",
    "PersonaMask",
    "PackedFFN",
    "apply_input_gains",
    "apply_output_bias",
    "available_backends",
    "masked_ffn",
    "masked_ffn_reference",
    "pack_ffn",
    "resolve_backend",
    "unpack_ffn",
]

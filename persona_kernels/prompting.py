"""The persona system prompt, shared by the pruner (which learns masks under it) and chat/evaluation."""

from __future__ import annotations

SYSTEM_TEMPLATE = "Role-play as the persona described below. Stay in character in every answer.\n{description}"


def persona_system_prompt(description: str | None) -> str | None:
    """The system prompt for a persona description (``None``: no persona, the model's default prompt)."""
    return None if description is None else SYSTEM_TEMPLATE.format(description=description.strip())

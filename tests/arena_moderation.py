"""A moderation hook for the arena tests (`--moderation arena_moderation:refuse_secrets`)."""


def refuse_secrets(prompt: str) -> str | None:
    return "no secrets in this arena" if "secret" in prompt.lower() else None

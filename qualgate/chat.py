"""Generation prompts through the model's chat template (`chat_template: true` on the equivalence,
judge and benchmarks instruments).

An instruct model is served with its template: a prompt becomes one user turn, rendered by the
tokenizer's own template with the assistant's generation prompt appended, then encoded without adding
a BOS (the template writes its own). Every stack of a run renders the same way, so the comparison is
unchanged in kind; the template's hash is in the report's provenance. Token-id prompts (the probes
cut from the domain text for prefix caching and speculation) are cache mechanics, not conversations,
and stay as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qualgate.errors import ConfigError

if TYPE_CHECKING:
    from qualgate.backends.base import Session
    from qualgate.models import ModelSpec


def template_of(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The conversation as the model sees it (text; encode it without an added BOS)."""
    return str(
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    )


def no_template(model: str, where: str) -> ConfigError:
    return ConfigError(
        f"{where}: chat_template is true but the tokenizer of model '{model}' has no chat template; "
        "use an instruct model's tokenizer (chat_template in tokenizer_config.json, or chat_template.jinja), "
        "or set chat_template: false"
    )


def require_template(model: ModelSpec, where: str) -> str:
    """The template of the pipeline's model, or exit 2 at validation when it has none."""
    from qualgate.models import load_hf_tokenizer

    template = template_of(load_hf_tokenizer(model))
    if template is None:
        raise no_template(model.path, where)
    return template


def provenance(model: ModelSpec) -> dict[str, Any]:
    """What the report records about the template the prompts went through."""
    template = require_template(model, "chat template")
    return {"applied": True, "sha256": hashlib.sha256(template.encode()).hexdigest(), "chars": len(template)}


def prompt_source(session: Session, source: str | list[int], chat: bool) -> str | list[int]:
    """A generation prompt as the session takes it: text through the template when `chat`, as token ids."""
    if chat and isinstance(source, str):
        return session.encode_chat(source)
    return source

"""The model's own tokenizer on a session: every backend encodes and decodes with it, so token ids
mean the same thing on every engine (the probe checks that an engine tokenizes the same way)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qualgate.backends.base import Session
from qualgate.chat import no_template, render, template_of


class TokenizedSession(Session):
    tokenizer: Any
    n_vocab: int  # the model's vocabulary (may exceed the tokenizer's: padded embedding rows)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id  # type: ignore[no-any-return]

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id  # type: ignore[no-any-return]

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    @property
    def chat_template(self) -> str | None:
        return template_of(self.tokenizer)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise no_template(self.stack.model.path, "chat prompt")
        return render(self.tokenizer, messages, add_generation_prompt)

    def encode_chat(self, text: str) -> list[int]:
        # The template writes its own BOS (as text the tokenizer maps to the special token): none added.
        return self.encode(self.render_chat([{"role": "user", "content": text}]), add_bos=False)

"""Chat templates: a model's Jinja template (tokenizer_config.json's ``chat_template``, or chat_template.jinja)
turning messages into the prompt text, rendered as transformers' ``apply_chat_template`` does, in Jinja's sandbox:
the template comes with the model, the messages from any client."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from smoe.io.tokenizer import TOKENIZER_CONFIG_FILE, read_chat_template
from smoe.serve.schema import APIError


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], where: str):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        try:
            self.template = env.from_string(source)
        except TemplateError as err:
            raise ValueError(f"{where}: the chat template does not compile ({err})") from None
        self.special_tokens = special_tokens

    def render(self, messages: list[dict]) -> str:
        """The prompt for ``messages``, ending where the assistant's reply begins; a template that refuses the
        messages (roles out of order, say) is a 400 with its message."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except Exception as err:  # raise_exception, the sandbox, or the template's own code failing on these messages
            raise APIError(400, f"messages: the model's chat template refused them ({err})", "messages") from None


def load_chat_template(directory: str | Path) -> ChatTemplate | None:
    """The chat template of a model directory or checkpoint, or None when it has none."""
    source, special = read_chat_template(directory)
    return None if source is None else ChatTemplate(source, special, str(Path(directory) / TOKENIZER_CONFIG_FILE))


def _raise(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)

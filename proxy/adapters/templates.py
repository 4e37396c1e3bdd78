"""Chat messages -> one prompt string, the way the model was trained to read them.

Built in (plain string joins: the hot path of the default route):
- `chatml`: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
  `<|im_start|>assistant\\n`. Tools, assistant `tool_calls` and `role: tool`
  messages are rendered exactly as the published Qwen2.5-Instruct template
  does (Hermes style: `<tools>`, `<tool_call>`, `<tool_response>`); the only
  difference is that no default system prompt is invented.
- `qwen2.5`: the published Qwen2.5-Instruct `chat_template` to the character,
  including its default system prompt ("You are Qwen, created by Alibaba Cloud...").

Any other value names a Jinja file in Hugging Face `chat_template` style,
compiled once per route in a sandbox configured like `transformers` does
(`trim_blocks`, `lstrip_blocks`, `loopcontrols`, a `tojson` that keeps
non-ASCII text and key order, `raise_exception`, `strftime_now`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from ..errors import BadRequest, ConfigError
from .chat_types import Message

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_STOPS = (IM_END, "<|endoftext|>")
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
_GENERATION = "<|im_start|>assistant\n"

# End-of-turn markers of common template families: a custom template's stop strings are
# those its source mentions (a ChatML template also ends generation on <|endoftext|>).
_KNOWN_STOPS = (IM_END, "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>",
                "<｜end▁of▁sentence｜>", "</s>")


class Template(Protocol):
    stops: tuple[str, ...]

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None) -> str: ...


def text_of(content: str | list[Any] | None) -> str:
    """Message content as text: text parts are joined by newlines (as vLLM does)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if len(content) == 1:
        return content[0].text
    return "\n".join(part.text for part in content)


def tojson(value: Any) -> str:
    """The `tojson` of Hugging Face's template environment: non-ASCII kept, keys in order, ", " / ": "."""
    return json.dumps(value, ensure_ascii=False)


def arguments_object(arguments: str | dict[str, Any]) -> Any:
    """Tool-call arguments as the template wants them: an object, parsed from OpenAI's JSON string.

    vLLM does the same before rendering; a string that is not JSON is rendered as a string.
    """
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


class ChatML:
    """ChatML with Qwen2.5's tool rendering; `default_system` makes it the exact Qwen2.5 template."""

    stops = CHATML_STOPS

    def __init__(self, default_system: str | None = None) -> None:
        self.default_system = default_system
        self._default_turn = f"{IM_START}system\n{default_system}{IM_END}\n" if default_system is not None else ""

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None) -> str:
        first_system = bool(messages) and messages[0].role == "system"
        if not tools and all(m.role != "tool" and not m.tool_calls for m in messages):
            # The hot path: plain turns.
            parts = [f"{IM_START}{m.role}\n{text_of(m.content)}{IM_END}\n" for m in messages]
            if not first_system and self._default_turn:
                parts.insert(0, self._default_turn)
            parts.append(_GENERATION)
            return "".join(parts)
        out: list[str] = []
        if tools:
            out.append(f"{IM_START}system\n")
            if first_system:
                out.append(text_of(messages[0].content) + "\n\n")
            elif self.default_system is not None:
                out.append(self.default_system + "\n\n")
            out.append(_TOOLS_HEAD)
            for tool in tools:
                out.append("\n" + tojson(tool))
            out.append(_TOOLS_TAIL)
        elif first_system:
            out.append(f"{IM_START}system\n{text_of(messages[0].content)}{IM_END}\n")
        else:
            out.append(self._default_turn)
        last = len(messages) - 1
        for i, m in enumerate(messages):
            role = m.role
            if role == "user" or (role == "system" and i) or (role == "assistant" and not m.tool_calls):
                out.append(f"{IM_START}{role}\n{text_of(m.content)}{IM_END}\n")
            elif role == "assistant":
                out.append(f"{IM_START}assistant")
                content = text_of(m.content)
                if content:
                    out.append("\n" + content)
                for call in m.tool_calls or ():
                    fn = call.function
                    out.append(f'\n<tool_call>\n{{"name": "{fn.name}", "arguments": '
                               f"{tojson(arguments_object(fn.arguments))}}}\n</tool_call>")
                out.append(f"{IM_END}\n")
            elif role == "tool":
                if i == 0 or messages[i - 1].role != "tool":
                    out.append(f"{IM_START}user")
                out.append(f"\n<tool_response>\n{text_of(m.content)}\n</tool_response>")
                if i == last or messages[i + 1].role != "tool":
                    out.append(f"{IM_END}\n")
        out.append(_GENERATION)
        return "".join(out)


class JinjaTemplate:
    """A Hugging Face style `chat_template` file, compiled once when the route is built."""

    def __init__(self, path: str | Path, label: str = "") -> None:
        path = Path(path)
        where = f"{label}: template" if label else "template"
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc}") from None
        try:
            self._template = jinja_environment().from_string(source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            line = getattr(exc, "lineno", None)
            raise ConfigError(f"{where}: {path}{f':{line}' if line else ''}: {exc}") from None
        self.path = path
        found = tuple(s for s in _KNOWN_STOPS if s in source)
        if IM_END in found and "<|endoftext|>" not in found:
            found += ("<|endoftext|>",)
        self.stops = found

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None) -> str:
        try:
            return self._template.render(messages=[_as_dict(m) for m in messages], tools=tools or None,
                                         add_generation_prompt=True, bos_token="", eos_token="")
        except BadRequest:
            raise
        except Exception as exc:  # raise_exception() in the template, or a template bug
            raise BadRequest(f"the route's chat template ({self.path.name}) rejected the messages: {exc}",
                             param="messages", code="template_error") from None


def _as_dict(m: Message) -> dict[str, Any]:
    """A message as `apply_chat_template` receives it; text parts flattened to one string."""
    d: dict[str, Any] = {"role": m.role, "content": None if m.content is None and m.tool_calls else text_of(m.content)}
    if m.name is not None:
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": arguments_object(c.function.arguments)}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


def jinja_environment() -> Any:
    """A sandbox set up like `transformers`' chat-template environment."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (training masks in HF templates): renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


BUILTIN = ("chatml", "qwen2.5")  # template names that are not files; config checks against these


def load_template(name: str, label: str = "") -> Template:
    """The template a route names: `chatml`, `qwen2.5`, or a path to a Jinja file (`label`: the route file)."""
    if name == "chatml":
        return ChatML()
    if name == "qwen2.5":
        return ChatML(QWEN_DEFAULT_SYSTEM)
    return JinjaTemplate(name, label)

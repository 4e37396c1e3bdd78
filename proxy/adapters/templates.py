"""Chat messages -> one prompt string, the way the model was trained to read them.

Built in:
- `chatml` (plain string joins: the hot path of the default route):
  `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
  `<|im_start|>assistant\\n`. Tools, assistant `tool_calls` and `role: tool`
  messages are rendered exactly as the published Qwen2.5-Instruct template
  does (Hermes style: `<tools>`, `<tool_call>`, `<tool_response>`); the only
  difference is that no default system prompt is invented.
- `qwen2.5`: the published Qwen2.5-Instruct `chat_template` to the character,
  including its default system prompt ("You are Qwen, created by Alibaba Cloud...").
- `qwen3`: Qwen3's own `chat_template` (the package file `qwen3.jinja`, see
  tests/data/README.md for its source), rendered through the Jinja environment
  below: tools, `reasoning_content`, earlier turns' reasoning dropped,
  `enable_thinking`.

Any other value names a file: a Hugging Face `tokenizer_config.json` (`*.json`:
its `chat_template`, a string or a list of named templates, and its special
tokens) or a Jinja file in `chat_template` style.

Jinja templates are rendered as `transformers`' `apply_chat_template` renders
them (`tokenization_utils_base.py` `apply_chat_template`,
`utils/chat_template_utils.py` `render_jinja_template` and
`_cached_compile_jinja_template`): the same sandboxed environment and helpers,
messages with their `None` fields dropped, the tokenizer's special tokens and
the request's `chat_template_kwargs` as top-level variables, `tools`,
`documents=None`, `add_generation_prompt` (True unless the request says
otherwise), and `continue_final_message` as transformers does it
(`render_prompt`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ..errors import BadRequest, ConfigError, TemplateFailed
from .core_types import Message

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
    bos_token: str  # "" when the template writes none; the dialects use it against a double BOS

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None,
               kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
        """The prompt; `kwargs` are the request's `chat_template_kwargs`; `add_generation_prompt` False
        ends it after the last message's turn, without opening the assistant's."""
        ...


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
    bos_token = ""

    def __init__(self, default_system: str | None = None) -> None:
        self.default_system = default_system
        self._default_turn = f"{IM_START}system\n{default_system}{IM_END}\n" if default_system is not None else ""

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None,
               kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
        """`kwargs` are ignored: the Qwen2.5 template reads no variable but messages, tools and
        `add_generation_prompt`."""
        generation = _GENERATION if add_generation_prompt else ""
        first_system = bool(messages) and messages[0].role == "system"
        if not tools and all(m.role != "tool" and not m.tool_calls for m in messages):
            # The hot path: plain turns.
            parts = _plain_turns(messages)
            if not first_system and self._default_turn:
                parts.insert(0, self._default_turn)
            parts.append(generation)
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
        out.append(generation)
        return "".join(out)


log = logging.getLogger("llmproxy")

# The special tokens `apply_chat_template` passes to every template (transformers'
# `SPECIAL_TOKENS_ATTRIBUTES`, as `special_tokens_map`: only those the tokenizer has).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Variables the proxy sets itself; a request's `chat_template_kwargs` may not replace them.
RESERVED_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
# What every route's template must render at load (some templates refuse a system message).
SAMPLE_MESSAGES = (Message(role="user", content="Hello"),)
SAMPLE_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class TemplateRejected(Exception):
    """The template's own `raise_exception(...)`: it refuses the conversation (the client's to fix)."""


def _plain_turns(messages: Sequence[Message]) -> list[str]:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message: what ChatML templates write for plain turns."""
    return [f"{IM_START}{m.role}\n{text_of(m.content)}{IM_END}\n" for m in messages]


class JinjaTemplate:
    """A Hugging Face style `chat_template`, compiled once when the route is built.

    `sources` holds one template (key "default") or, from a tokenizer config's named
    list, also "tool_use", which serves the requests that carry tools.
    `special` are the tokenizer's special tokens (`bos_token`, `eos_token`, ...).
    """

    def __init__(self, sources: dict[str, str], origin: str, *, label: str = "", route: str = "",
                 special: dict[str, str] | None = None) -> None:
        self.origin = origin  # what messages call it: a file name or a built-in's name
        self.route = route
        self._where = f"{label}: template" if label else "template"
        env = jinja_environment()
        compiled = {}
        for key, source in sources.items():
            try:
                compiled[key] = env.from_string(source)
            except Exception as exc:  # jinja2.TemplateSyntaxError and friends
                line = getattr(exc, "lineno", None)
                entry = f" (entry {key!r})" if len(sources) > 1 else ""
                raise ConfigError(f"{self._where}: {origin}{f':{line}' if line else ''}{entry}: {exc}") from None
        self._default = compiled["default"]
        self._tool_use = compiled.get("tool_use", self._default)
        self.special = dict(special or {})
        text = "".join(sources.values())
        eos = self.special.get("eos_token", "")
        found = tuple(s for s in _KNOWN_STOPS if s in text)
        if IM_END in found and "<|endoftext|>" not in found:
            found += ("<|endoftext|>",)
        if eos and eos not in found:
            found += (eos,)
        self.stops = found
        bos = self.special.get("bos_token", "")
        self.bos_token = bos if bos and ("bos_token" in text or bos in text) else ""
        self._check_samples("tool_use" in sources)

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None,
               kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
        template = self._tool_use if tools else self._default
        context = self.special
        if kwargs:
            clash = RESERVED_KWARGS.intersection(kwargs)
            if clash:
                raise BadRequest(f"chat_template_kwargs: {min(clash)!r} is set by the proxy, not by the request",
                                 param="chat_template_kwargs", code="invalid_value")
            context = {**self.special, **kwargs}  # the request's win over special tokens, as in transformers
        try:
            return template.render(messages=[_as_dict(m) for m in messages], tools=tools or None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **context)
        except TemplateRejected as exc:
            raise BadRequest(f"the chat template ({self.origin}) rejected the conversation: {exc}",
                             param="messages", code="template_rejected") from None
        except Exception as exc:  # a template bug (or a sandbox refusal): the route's fault, not the client's
            reason = f"{type(exc).__name__}: {exc}"
            log.error("route %r: chat template %s failed: %s", self.route, self.origin, reason)
            whose = f"route {self.route!r}" if self.route else "this route"
            raise TemplateFailed(f"the chat template of {whose} ({self.origin}) failed: {reason}") from None

    def _check_samples(self, has_tool_use: bool) -> None:
        """Render one user message (and, with one sample tool, the template that serves tools):
        a template that cannot is a broken route, found at load rather than by the first client."""
        messages = [_as_dict(m) for m in SAMPLE_MESSAGES]
        cases = [(self._default, None, "one user message")]
        cases.append((self._tool_use, [SAMPLE_TOOL], "one user message and one tool"))
        for template, tools, what in cases:
            try:
                template.render(messages=messages, tools=tools, documents=None, add_generation_prompt=True,
                                **self.special)
            except TemplateRejected as exc:
                if tools and not has_tool_use:
                    continue  # a single template may refuse tools: such requests get its 400
                raise ConfigError(f"{self._where}: {self.origin}: cannot render a sample conversation ({what}): "
                                  f"it raised {exc}") from None
            except Exception as exc:
                raise ConfigError(f"{self._where}: {self.origin}: cannot render a sample conversation ({what}): "
                                  f"{type(exc).__name__}: {exc}") from None


class Qwen3(JinjaTemplate):
    """Qwen3's own template, with a string-join path for plain turns.

    Measured with bench/templates.py: the Jinja render costs ~140 µs for a system + user
    request, about as much as the rest of the proxy's work per request; joined here, ~2 µs.
    A property test (tests/test_chat_templates.py) keeps both equal. What is plain:
    no tools, only system/user/assistant messages, no assistant turn after the last user
    message (Qwen3 writes a `<think>` block there), no reasoning in any assistant turn
    (earlier turns' reasoning is cut, which the template does), and no template variable
    but `enable_thinking`. Everything else goes through the template itself.
    """

    def __init__(self, label: str = "", route: str = "") -> None:
        super().__init__({"default": _QWEN3.read_text(encoding="utf-8")}, "qwen3", label=label, route=route)

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None,
               kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
        if tools or not messages or (kwargs and kwargs.keys() - {"enable_thinking"}) or not add_generation_prompt:
            return super().render(messages, tools, kwargs, add_generation_prompt)
        last = messages[-1]
        if last.role != "user" or _is_tool_response(last):
            return super().render(messages, tools, kwargs)
        for m in messages:
            if m.role == "assistant":
                if m.tool_calls or m.reasoning_content is not None or "</think>" in text_of(m.content):
                    return super().render(messages, tools, kwargs)
            elif m.role not in ("system", "user"):
                return super().render(messages, tools, kwargs)
        parts = _plain_turns(messages)
        parts.append(_GENERATION)
        if kwargs and kwargs.get("enable_thinking") is False:  # the template's `enable_thinking is false`
            parts.append("<think>\n\n</think>\n\n")
        return "".join(parts)


# transformers' sentinel for `continue_final_message` (utils/chat_template_utils.py `render_jinja_template`).
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_prompt(template: Template, messages: Sequence[Message], tools: list[dict[str, Any]] | None,
                  kwargs: dict[str, Any] | None = None, *, add_generation_prompt: bool = True,
                  continue_final_message: bool = False) -> str:
    """The prompt, with vLLM's chat template controls.

    `continue_final_message` (the last message is the assistant's, already begun): the prompt ends
    right after that message's content, with no end-of-turn token, so the model goes on writing it.
    Done as transformers' `render_jinja_template` does it, for any template: a sentinel is appended to
    the final message's content, the conversation is rendered without a generation prompt, and the
    text is cut where the sentinel starts (before it, and before any spacing the template trimmed).
    """
    if not continue_final_message:
        return template.render(messages, tools, kwargs, add_generation_prompt)
    last = messages[-1]
    if last.content is None:
        raise BadRequest("`continue_final_message` is set but the final message has no content to continue",
                         param="continue_final_message", code="invalid_value")
    final = text_of(last.content)
    tagged = [*messages[:-1], msgspec.structs.replace(last, content=final + CONTINUE_TAG)]
    rendered = template.render(tagged, tools, kwargs, False)
    tag = CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise BadRequest("`continue_final_message` is set but the route's chat template does not write the final "
                         "message as it is, so it cannot be continued", param="continue_final_message",
                         code="invalid_value")
    loc = rendered.rindex(tag)
    if rendered[loc:loc + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:loc]
    return rendered[:loc].rstrip()


def _is_tool_response(m: Message) -> bool:
    text = text_of(m.content)
    return text.startswith("<tool_response>") and text.endswith("</tool_response>")


def _as_dict(m: Message) -> dict[str, Any]:
    """A message as `apply_chat_template` hands it to the template.

    Fields that are `None` are left out, as transformers' `_normalize_chat_messages`
    does, but `content` is always text, as vLLM renders it (`None` and text parts
    become "" and newline-joined text); tool-call arguments are objects (vLLM parses
    OpenAI's JSON string before rendering). `reasoning_content` is also given as
    `thinking`, as transformers' `_alias_reasoning_fields` does (gpt-oss templates read that).
    """
    d: dict[str, Any] = {"role": m.role, "content": text_of(m.content)}
    if m.name is not None:
        d["name"] = m.name
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            call: dict[str, Any] = {"id": c.id} if c.id is not None else {}
            call["type"] = "function"
            call["function"] = {"name": c.function.name, "arguments": arguments_object(c.function.arguments)}
            calls.append(call)
        d["tool_calls"] = calls
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        d = {"thinking": m.reasoning_content, **d, "reasoning_content": m.reasoning_content}
    return d


def jinja_environment() -> Any:
    """A sandbox set up like `transformers`' chat-template environment (`_cached_compile_jinja_template`)."""
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
        raise TemplateRejected(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        """`dict(...)` without the class itself, so templates cannot reach dict's attributes."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore names (no reaching CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


BUILTIN = ("chatml", "qwen2.5", "qwen3")  # template names that are not files; config checks against these
_QWEN3 = Path(__file__).with_name("qwen3.jinja")


def load_template(name: str, label: str = "", route: str = "") -> Template:
    """The template a route names: a built-in, a `tokenizer_config.json` or a Jinja file.

    `label` is the route file (it starts every `ConfigError`), `route` the route's name
    (a template failing at run time names it in its 500).
    """
    if name == "chatml":
        return ChatML()
    if name == "qwen2.5":
        return ChatML(QWEN_DEFAULT_SYSTEM)
    if name == "qwen3":
        return Qwen3(label=label, route=route)
    path = Path(name)
    where = f"{label}: template" if label else "template"
    if path.suffix == ".json":
        sources, special = _tokenizer_config(path, where)
        return JinjaTemplate(sources, path.name, label=label, route=route, special=special)
    return JinjaTemplate({"default": _read(path, where)}, path.name, label=label, route=route)


def _read(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc}") from None


def _tokenizer_config(path: Path, where: str) -> tuple[dict[str, str], dict[str, str]]:
    """The templates and special tokens of a Hugging Face `tokenizer_config.json`.

    `chat_template` is a string or a list of `{"name", "template"}` (transformers
    picks `tool_use` when the request has tools, `default` otherwise); a config
    without one uses the `chat_template.jinja` beside it, as transformers does.
    Special tokens are strings or serialised `AddedToken`s (`{"content": ...}`).
    """
    try:
        config = json.loads(_read(path, where))
    except ValueError as exc:
        raise ConfigError(f"{where}: {path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: {path}: expected a JSON object (a tokenizer_config.json)")
    chat_template = config.get("chat_template")
    sources: dict[str, str] = {}
    if chat_template is None:
        beside = path.with_name("chat_template.jinja")
        if not beside.is_file():
            raise ConfigError(f"{where}: {path}: has no chat_template, and there is no chat_template.jinja beside it")
        sources["default"] = _read(beside, where)
    elif isinstance(chat_template, str):
        sources["default"] = chat_template
    elif isinstance(chat_template, list):
        named: dict[str, str] = {}
        for i, entry in enumerate(chat_template):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ConfigError(f"{where}: {path}: chat_template[{i}]: expected {{\"name\": ..., \"template\": ...}}")
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise ConfigError(f"{where}: {path}: chat_template has no 'default' entry (it has "
                              f"{', '.join(repr(n) for n in named) or 'none'}): requests without tools need one")
        sources = {k: named[k] for k in ("default", "tool_use") if k in named}
    else:
        raise ConfigError(f"{where}: {path}: chat_template: expected a string or a list of named templates, "
                          f"got {type(chat_template).__name__}")
    special: dict[str, str] = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {path}: {key}: expected a string or an AddedToken object")
        special[key] = value
    return sources, special

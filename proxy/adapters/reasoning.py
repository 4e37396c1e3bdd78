"""`<think>…</think>` out of completion text, for routes with `reasoning: think`.

The proxy rendered the prompt, so it knows where the answer starts:
- inside a thought when the prompt itself ends with `<think>` (templates that pre-fill it in
  the generation prompt: the completion then closes `</think>` without opening it);
- otherwise in a thought only if the completion opens with `<think>` (after optional white
  space), and as answer text, streamed at once, as soon as its first characters cannot be that
  tag. Only a start that could still be `<think>` is held.
The prompt decides, as in vLLM's serving layer (`prompt_is_reasoning_end`: a prompt that closed the
thought sends every delta as content) and its Qwen3 parser (vllm/reasoning/qwen3_reasoning_parser.py:
with `<think>` pre-filled, all text before `</think>` is reasoning). Where vLLM's parser, with thinking
on and no tag pre-filled, would hold an answer that never opens `<think>` as reasoning until the end,
this streams it as the answer it is (a template that did not pre-fill lets the model choose).
White space next to the tags is dropped. As with tool calls, one incremental parser serves the
whole and the streamed paths.
"""

from __future__ import annotations

from .tags import held

OPEN = "<think>"
CLOSE = "</think>"
_START, _THINK, _ANSWER = range(3)


def prefills_think(prompt: str) -> bool:
    """Did the template leave the model inside a `<think>` block?"""
    return prompt.rstrip().endswith(OPEN)


class ThinkSplitter:
    """Feed completion text; get back `(reasoning, content)` decided so far."""

    __slots__ = ("_state", "_pending", "_lead")

    def __init__(self, prefilled: bool = False) -> None:
        self._state = _THINK if prefilled else _START
        self._pending = ""
        self._lead = True  # drop white space at the start of the current part

    def feed(self, text: str) -> tuple[str, str]:
        s, self._pending = self._pending + text, ""
        reasoning = ""
        if self._state == _START:
            stripped = s.lstrip()
            if stripped.startswith(OPEN):
                self._state, s = _THINK, stripped[len(OPEN):]
            elif not stripped or OPEN.startswith(stripped):
                self._pending = s
                return "", ""
            else:  # not a thought: the answer, as it came (its leading white space kept)
                self._state, self._lead = _ANSWER, False
                return "", s
        if self._state == _THINK:
            j = s.find(CLOSE)
            if j < 0:
                keep = held(s, CLOSE)
                body = s[: len(s) - keep].rstrip()  # white space may precede `</think>`: hold it
                self._pending = s[len(body):]
                return self._lead_strip(body), ""
            reasoning = self._lead_strip(s[:j].rstrip())
            s = s[j + len(CLOSE):]
            self._state, self._lead = _ANSWER, True
        return reasoning, self._lead_strip(s)

    def finish(self) -> tuple[str, str]:
        """End of the completion: held text is decided now."""
        s, self._pending = self._pending, ""
        if self._state == _THINK:
            return self._lead_strip(s), ""  # an unfinished thought (e.g. cut by max_tokens)
        return "", s  # a start that never became `<think>`: plain content, as it came

    def _lead_strip(self, text: str) -> str:
        if self._lead and text:
            text = text.lstrip()
            if text:
                self._lead = False
        return text


def split_all(text: str, prefilled: bool = False) -> tuple[str, str]:
    """A whole completion -> (reasoning, content)."""
    splitter = ThinkSplitter(prefilled)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2

"""Completion text -> content / tool calls / reasoning, whole and streamed in any split; the SSE decoder."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.adapters import reasoning, toolcalls
from proxy.adapters.tags import StopFilter, held
from proxy.adapters.toolcalls import ParsedCall, ToolCallSplitter
from proxy.sse import SSEDecoder


def call(name: str, args: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


# --- tool calls: whole texts --------------------------------------------------------------

def test_no_tool_call_is_all_content():
    assert toolcalls.split_all("Just text, with <b>tags</b> and a < sign. ") == (
        "Just text, with <b>tags</b> and a < sign. ", [])


def test_one_tool_call():
    content, calls = toolcalls.split_all(call("get_weather", {"city": "Paris"}))
    assert content == ""
    assert calls == [ParsedCall("get_weather", '{"city": "Paris"}')]


def test_several_tool_calls_and_text_around_them():
    text = "Let me check both.\n" + call("a", {"x": 1}) + "\n" + call("b", {}) + "\nDone?"
    content, calls = toolcalls.split_all(text)
    assert [c.name for c in calls] == ["a", "b"]
    assert [json.loads(c.arguments) for c in calls] == [{"x": 1}, {}]
    assert content == "Let me check both.Done?"


def test_broken_json_block_stays_content_verbatim():
    text = "Try: <tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": }\n</tool_call> ok " + call("b", {"y": 2})
    content, calls = toolcalls.split_all(text)
    assert content == "Try: <tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": }\n</tool_call> ok"
    assert calls == [ParsedCall("b", '{"y": 2}')]


def test_block_without_name_is_content():
    content, calls = toolcalls.split_all('<tool_call>{"arguments": {}}</tool_call>')
    assert calls == [] and content == '<tool_call>{"arguments": {}}</tool_call>'


def test_unterminated_block_at_the_end():
    assert toolcalls.split_all('<tool_call>\n{"name": "f", "arguments": {"a": "ü"}}\n')[1] == [
        ParsedCall("f", '{"a": "ü"}')]
    assert toolcalls.split_all("<tool_call>\n{\"name\": \"f\", ") == ("<tool_call>\n{\"name\": \"f\", ", [])


def test_arguments_given_as_a_string_are_kept():
    assert toolcalls.split_all('<tool_call>{"name": "f", "arguments": "{\\"a\\":1}"}</tool_call>')[1] == [
        ParsedCall("f", '{"a":1}')]


# --- tool calls: streamed in every split ------------------------------------------------------

SAMPLE = ("Sure, checking.\n" + call("get_weather", {"city": "Paris", "unit": "°C"}) + "\n"
          + call("get_time", {}) + "\n<tool_call>{broken</tool_call> tail <tool")


def stream_split(text: str, cuts: list[int]) -> tuple[str, list[ParsedCall]]:
    splitter = ToolCallSplitter()
    items = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(text)]:
        items += splitter.feed(text[prev:cut])
        prev = cut
    items += splitter.finish()
    return "".join(x for x in items if isinstance(x, str)), [x for x in items if isinstance(x, ParsedCall)]


def test_stream_parser_equals_whole_parser_for_every_single_split():
    whole = toolcalls.split_all(SAMPLE)
    assert len(whole[1]) == 2
    for cut in range(len(SAMPLE) + 1):
        assert stream_split(SAMPLE, [cut]) == whole, cut


def test_stream_parser_fed_char_by_char():
    assert stream_split(SAMPLE, list(range(len(SAMPLE)))) == toolcalls.split_all(SAMPLE)


def test_partial_tag_is_held_only_while_ambiguous():
    splitter = ToolCallSplitter()
    assert splitter.feed("Hello <tool_") == ["Hello"]  # "<tool_" (and the space before it) wait
    assert splitter.feed("box> world") == [" <tool_box> world"]  # not a tag after all: released at once


PIECES = st.lists(st.sampled_from([
    "a", " ", "\n", "<", "tool_call>", "<tool_call>", "</tool_call>", "</tool", "_call>", '{"name": "f"',
    ', "arguments": {"k": [1, "x"]}}', "}", "<think>", "</think>", "ü", "<|im_end|>",
]), max_size=30)


@settings(max_examples=300, deadline=None)
@given(PIECES, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_property_tool_calls_split_anywhere_equal_whole(pieces, cuts):
    text = "".join(pieces)
    assert stream_split(text, [c for c in cuts if c <= len(text)]) == toolcalls.split_all(text)


# --- reasoning -------------------------------------------------------------------------------

def test_think_block_splits_reasoning_from_content():
    assert reasoning.split_all("<think>\nLet me think.\n</think>\n\nThe answer is 4.") == (
        "Let me think.", "The answer is 4.")


def test_closing_without_opening_splits_only_after_a_prefilled_think():
    text = "Let me think.</think>\n\nThe answer is 4."
    assert reasoning.split_all(text, prefilled=True) == ("Let me think.", "The answer is 4.")
    assert reasoning.split_all(text) == ("", text)  # the prompt left no thought open: the answer, streamed at once


def test_prefilled_think_in_the_prompt():
    assert reasoning.prefills_think("<|im_start|>assistant\n<think>\n")
    assert reasoning.split_all("Thinking.\n</think>\nAnswer.", prefilled=True) == ("Thinking.", "Answer.")


def test_no_think_tags_is_all_content_as_it_came():
    assert reasoning.split_all("  Plain answer with a </thin in it ") == ("", "  Plain answer with a </thin in it ")


def test_unfinished_thought_is_reasoning():
    assert reasoning.split_all("<think>still going") == ("still going", "")


def test_think_streams_at_once_when_opened():
    splitter = reasoning.ThinkSplitter()
    assert splitter.feed("<think>step one") == ("step one", "")
    assert splitter.feed(" two</th") == (" two", "")
    assert splitter.feed("ink>Yes") == ("", "Yes")


def think_stream(text: str, cuts: list[int], prefilled: bool = False) -> tuple[str, str]:
    splitter = reasoning.ThinkSplitter(prefilled)
    r = c = ""
    prev = 0
    for cut in sorted(set(cuts)) + [len(text)]:
        a, b = splitter.feed(text[prev:cut])
        r, c, prev = r + a, c + b, cut
    a, b = splitter.finish()
    return r + a, c + b


@settings(max_examples=300, deadline=None)
@given(PIECES, st.lists(st.integers(min_value=0, max_value=400), max_size=8), st.booleans())
def test_property_reasoning_split_anywhere_equal_whole(pieces, cuts, prefilled):
    text = "".join(pieces)
    assert think_stream(text, [c for c in cuts if c <= len(text)], prefilled) == reasoning.split_all(text, prefilled)


def test_reasoning_every_single_split():
    for text in ("<think>\nA b.\n</think>\n\nC d.", "A b.\n</think>C", "  <think>x</think>  y  ", "no tags"):
        whole = reasoning.split_all(text)
        for cut in range(len(text) + 1):
            assert think_stream(text, [cut]) == whole, (text, cut)


# --- stop strings ------------------------------------------------------------------------------

def test_held_tail():
    assert held("abc<tool_", "<tool_call>") == 6
    assert held("abc<tool_call>", "<tool_call>") == 0  # a whole tag is not a partial one
    assert held("a<b<to", "<tool_call>") == 3


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab<|im_end>", max_size=40), st.lists(st.integers(0, 40), max_size=6))
def test_property_stop_filter_split_anywhere(text, cuts):
    stops = ("<|im_end|>", "<|endoftext|>")
    whole = StopFilter(stops)
    expected = whole.feed(text) + whole.finish()
    assert "<|im_end|>" not in expected
    assert expected == text.split("<|im_end|>")[0]
    f = StopFilter(stops)
    out, prev = "", 0
    for cut in sorted({c for c in cuts if c <= len(text)}) + [len(text)]:
        out += f.feed(text[prev:cut])
        prev = cut
    assert out + f.finish() == expected


# --- SSE decoder ---------------------------------------------------------------------------------

SSE_BODY = (b": keep-alive comment\r\n"
            b"data: {\"a\": 1}\r\n\r\n"
            b"event: message\nid: 7\ndata: line one\ndata: line two\n\n"
            b"data:no-space\r\rdata: {\"b\": \"\xc3\xbc\"}\n\n"
            b"data: [DONE]\n\n")
SSE_EVENTS = [b'{"a": 1}', b"line one\nline two", b"no-space", b'{"b": "\xc3\xbc"}', b"[DONE]"]


def sse_split(body: bytes, cuts: list[int]) -> list[bytes]:
    dec = SSEDecoder()
    events, prev = [], 0
    for cut in sorted(set(cuts)) + [len(body)]:
        events += dec.feed(body[prev:cut])
        prev = cut
    return events + dec.close()


def test_sse_whole_and_byte_by_byte():
    assert sse_split(SSE_BODY, []) == SSE_EVENTS
    assert sse_split(SSE_BODY, list(range(len(SSE_BODY)))) == SSE_EVENTS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SSE_BODY)), max_size=12))
def test_property_sse_random_splits(cuts):
    assert sse_split(SSE_BODY, cuts) == SSE_EVENTS


def test_sse_unterminated_last_event_counts_at_close():
    assert sse_split(b"data: x\n\ndata: y", [3]) == [b"x", b"y"]

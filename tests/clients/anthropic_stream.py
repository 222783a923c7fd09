#!/usr/bin/env python3
"""A real client of the openai_proxy example's Anthropic route: Anthropic's official
Python package, against the proxy in front of the example's mock upstream.

Checks, with the SDK's own retries off so that only the proxy can retry:
- a message streamed with `messages.stream`: the text came in more than one delta, the
  events had their names (the SDK types each event by its `event:` line and skips
  `ping`), the final message ended with `stop_reason: end_turn` and usage;
- a stream whose first attempt the mock answers with an in-band `overloaded_error`
  (`x-mock-scenario: overloaded-once:KEY`): the client sees one clean stream, the
  mock saw two attempts (`x-mock-attempt: 2`), and the proxy's /metrics counts the
  retry under provider="anthropic";
- the same call without streaming: a `message` with content;
- an error the proxy answers itself (`GET /v1/messages`, a 405) parses as Anthropic's
  error shape.

Usage: python3 tests/clients/anthropic_stream.py http://127.0.0.1:PORT
(or with ANTHROPIC_BASE_URL set). Exits 1 on any failure.
"""

import os
import re
import sys
import time
import urllib.request
import uuid

import anthropic

from checks import check, fail


def in_band_retries(base_url):
    """The proxy's count of retries that cured an in-band error on this route."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("stream_retries_total{"):
            labels, value = line.rsplit(" ", 1)
            wanted = ['outcome="success"', 'provider="anthropic"', 'reason="in_band_error"']
            if all(label in labels for label in wanted):
                total += float(value)
    return total


def main():
    base_url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ANTHROPIC_BASE_URL")
    if not base_url:
        fail("give the proxy's base URL, e.g. http://127.0.0.1:8080")
    base_url = base_url.rstrip("/")
    # No retries: a failure must show here, not be hidden by the SDK trying again.
    client = anthropic.Anthropic(base_url=base_url, api_key="test", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "Say hello."}]
    print(f"anthropic {anthropic.__version__}, base URL {base_url}")

    started = time.monotonic()
    kinds = []
    with client.messages.stream(model="mock-model", max_tokens=64, messages=messages) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    elapsed = time.monotonic() - started
    deltas = kinds.count("content_block_delta")
    check(deltas > 1, f"the text came in {deltas} deltas, expected several: {kinds}")
    check(kinds[0] == "message_start", f"first event {kinds[0]!r}")
    check("message_stop" in kinds, f"no message_stop in {kinds}")
    check(final.stop_reason == "end_turn", f"stop_reason {final.stop_reason!r}")
    text = "".join(block.text for block in final.content if block.type == "text")
    check(text.strip() != "", "no text arrived")
    check(final.usage.output_tokens > 0, f"usage {final.usage!r}")
    print(f"streamed: {len(kinds)} events, {deltas} deltas in {elapsed * 1000:.0f} ms: {text!r}")

    retries_before = in_band_retries(base_url)
    scenario = f"overloaded-once:{uuid.uuid4()}"
    stream = client.messages.create(
        model="mock-model",
        max_tokens=64,
        messages=messages,
        stream=True,
        extra_headers={"x-mock-scenario": scenario},
    )
    text = ""
    for event in stream:
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
    attempt = stream.response.headers.get("x-mock-attempt")
    check(attempt == "2", f"x-mock-attempt {attempt!r}: the upstream should have seen 2")
    check(text.strip() != "", "no text after the retry")
    retries = in_band_retries(base_url) - retries_before
    check(retries == 1, f"the proxy counted {retries} in-band retries, expected 1")
    print(f"overloaded first, retried by the proxy: attempt {attempt}, {text!r}")

    message = client.messages.create(model="mock-model", max_tokens=64, messages=messages)
    check(message.type == "message" and message.role == "assistant", f"{message!r}")
    check(message.content and message.content[0].text.strip(), "no content in the message")
    check(message.stop_reason == "end_turn", f"stop_reason {message.stop_reason!r}")
    print(f"non-streaming: {message.id}, {message.usage.output_tokens} tokens")

    try:
        client.get("/v1/messages", cast_to=object)
        fail("GET /v1/messages succeeded")
    except anthropic.APIStatusError as error:
        check(error.status_code == 405, f"status {error.status_code}")
        body = error.body
        check(
            isinstance(body, dict) and body.get("type") == "error",
            f"not Anthropic's error shape: {body!r}",
        )
        check(body["error"]["type"] == "invalid_request_error", f"{body!r}")
        check(re.search("not allowed", body["error"]["message"]), f"{body!r}")
        print(f"405 in Anthropic's shape: {body}")
    print("ok")


if __name__ == "__main__":
    try:
        main()
    except anthropic.AnthropicError as error:
        fail(f"{type(error).__name__}: {error}")

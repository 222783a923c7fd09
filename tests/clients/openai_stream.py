#!/usr/bin/env python3
"""A real client of the openai_proxy example: OpenAI's official Python package.

Streams a chat completion through the proxy, then makes the same call without
streaming, and checks what came back: every chunk parsed as a `chat.completion.chunk`,
content arrived in more than one chunk, the stream ended with `finish_reason: stop`
and then `[DONE]` (the package ends its iterator there, and raises if the connection
breaks first), the non-streaming answer is a `chat.completion` with content, and an
error the proxy answers itself (`GET /v1/chat/completions`, a 405) parses as OpenAI's
error shape.

Usage: python3 tests/clients/openai_stream.py http://127.0.0.1:PORT/v1
(or with OPENAI_BASE_URL set). Exits 1 on any failure.
"""

import os
import sys
import time

import openai

from checks import check, fail


def main():
    base_url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        fail("give the proxy's base URL, e.g. http://127.0.0.1:8080/v1")
    # No retries: a failure must show here, not be hidden by the SDK trying again.
    client = openai.OpenAI(base_url=base_url, api_key="test", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "Say hello."}]
    print(f"openai {openai.__version__}, base URL {base_url}")

    started = time.monotonic()
    stream = client.chat.completions.create(
        model="mock-model",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = 0
    content_chunks = 0
    first_content_at = None
    text = ""
    finish_reason = None
    usage = None
    for chunk in stream:
        chunks += 1
        check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object!r}")
        check(chunk.model == "mock-model", f"chunk model {chunk.model!r}")
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                content_chunks += 1
                if first_content_at is None:
                    first_content_at = time.monotonic() - started
                text += choice.delta.content
            if choice.finish_reason is not None:
                finish_reason = choice.finish_reason
    elapsed = time.monotonic() - started
    check(content_chunks > 1, f"content came in {content_chunks} chunks, expected several")
    check(text.strip() != "", "no content arrived")
    check(finish_reason == "stop", f"finish_reason {finish_reason!r}, expected 'stop'")
    check(usage is not None and usage.total_tokens > 0, f"usage {usage!r}")
    print(
        f"streamed: {chunks} chunks, {content_chunks} with content, first content after "
        f"{first_content_at * 1000:.0f} ms, all in {elapsed * 1000:.0f} ms, "
        f"finish_reason={finish_reason}, total_tokens={usage.total_tokens}"
    )
    print(f"streamed text: {text!r}")

    completion = client.chat.completions.create(model="mock-model", messages=messages)
    check(completion.object == "chat.completion", f"object {completion.object!r}")
    message = completion.choices[0].message
    check(message.role == "assistant", f"role {message.role!r}")
    check(bool(message.content and message.content.strip()), "no content in the completion")
    check(completion.choices[0].finish_reason == "stop", "non-streaming finish_reason")
    print(
        f"non-streaming: {completion.object} {completion.id}, "
        f"{completion.usage.total_tokens} tokens: {message.content!r}"
    )

    # An error the proxy answers itself parses as OpenAI's error shape.
    try:
        client.get("/chat/completions", cast_to=object)
        fail("GET /v1/chat/completions succeeded")
    except openai.APIStatusError as error:
        check(error.status_code == 405, f"status {error.status_code}")
        check(error.type == "invalid_request_error", f"type {error.type!r}")
        check(error.code == "method_not_allowed", f"code {error.code!r}")
        print(f"405 in OpenAI's shape: {error.body}")
    print("ok")


if __name__ == "__main__":
    try:
        main()
    except openai.OpenAIError as error:
        fail(f"{type(error).__name__}: {error}")

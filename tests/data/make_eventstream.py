#!/usr/bin/env python3
"""Write the AWS eventstream (Bedrock) captures in this directory.

Stdlib only and deterministic: running it again produces byte-identical files.

Message layout (all integers big-endian):

    total length u32 | headers length u32 | prelude CRC32 u32 |
    headers | payload | message CRC32 u32

The prelude CRC covers the first 8 bytes; the message CRC covers everything
before it. Header: name length u8, name, value type u8 (7 = string),
value length u16, value.

Usage: python3 make_eventstream.py
"""

import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

MAX_MESSAGE_LEN = 16 * 1024 * 1024

# Bedrock pads each event with a "p" field of varying length.
PAD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def crc32(data):
    return zlib.crc32(data) & 0xFFFFFFFF


def header(name, value):
    n = name.encode("utf-8")
    v = value.encode("utf-8")
    return struct.pack(">B", len(n)) + n + struct.pack(">BH", 7, len(v)) + v


def prelude(total_len, headers_len):
    p = struct.pack(">II", total_len, headers_len)
    return p + struct.pack(">I", crc32(p))


def message(headers, payload):
    hb = b"".join(header(k, v) for k, v in headers)
    total = 12 + len(hb) + len(payload) + 4
    body = prelude(total, len(hb)) + hb + payload
    return body + struct.pack(">I", crc32(body))


def to_json(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def event(event_type, obj):
    return message(
        [
            (":event-type", event_type),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        to_json(obj),
    )


def exception(exception_type, obj):
    return message(
        [
            (":exception-type", exception_type),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ],
        to_json(obj),
    )


def write(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)


def message_start():
    return event("messageStart", {"p": PAD[:42], "role": "assistant"})


def delta(text, pad):
    return event(
        "contentBlockDelta",
        {"contentBlockIndex": 0, "delta": {"text": text}, "p": PAD[:pad]},
    )


def main():
    write(
        "bedrock_converse.eventstream",
        message_start()
        + delta("Hello", 4)
        + delta("! How can I", 17)
        + delta(" help you today?", 9)
        + event("contentBlockStop", {"contentBlockIndex": 0, "p": PAD[:29]})
        + event("messageStop", {"p": PAD[:11], "stopReason": "end_turn"})
        + event(
            "metadata",
            {
                "metrics": {"latencyMs": 612},
                "usage": {"inputTokens": 14, "outputTokens": 9, "totalTokens": 23},
            },
        ),
    )

    write(
        "bedrock_throttling.eventstream",
        exception(
            "throttlingException",
            {"message": "Too many requests, please wait before trying again."},
        ),
    )

    write(
        "bedrock_service_unavailable.eventstream",
        exception(
            "serviceUnavailableException",
            {"message": "Bedrock is unable to process your request."},
        ),
    )

    write(
        "bedrock_model_stream_error.eventstream",
        exception(
            "modelStreamErrorException",
            {
                "message": "Model stream error: the model returned an error while streaming the response.",
                "originalStatusCode": 500,
                "originalMessage": "Internal error while generating output. Please retry your request.",
            },
        ),
    )

    write(
        "bedrock_internal_server.eventstream",
        exception(
            "internalServerException",
            {"message": "The server encountered an internal error while processing the request."},
        ),
    )

    write(
        "bedrock_validation.eventstream",
        exception(
            "validationException",
            {
                "message": "Malformed input request: #: required key [messages] not found, "
                "please reformat your input and try again."
            },
        ),
    )

    # Valid messageStart whose prelude CRC is wrong. The message CRC is
    # recomputed over the altered bytes, so the prelude CRC is the only defect.
    m = bytearray(message_start())
    m[8:12] = struct.pack(">I", crc32(bytes(m[0:8])) ^ 0xDEADBEEF)
    m[-4:] = struct.pack(">I", crc32(bytes(m[:-4])))
    write("bedrock_bad_prelude_crc.eventstream", bytes(m))

    # Valid messageStart with one payload byte flipped ("assistant" ->
    # "assistAnt"); the prelude is intact but the message CRC no longer matches.
    m = bytearray(message_start())
    i = m.rindex(b"assistant") + 6
    m[i] ^= 0x20
    write("bedrock_bad_message_crc.eventstream", bytes(m))

    # A prelude declaring a 12-byte message (shorter than the 16-byte minimum).
    write("bedrock_too_short.eventstream", prelude(12, 0))

    # A prelude declaring a message one byte over 16 MiB, then a few bytes.
    write(
        "bedrock_too_long.eventstream",
        prelude(MAX_MESSAGE_LEN + 1, 0) + b'{"p":"abcd"}',
    )

    # messageStart followed by a single ~200 KB contentBlockDelta.
    sentence = (
        "The quick brown fox jumps over the lazy dog while the streaming "
        "response keeps flowing in long, steady paragraphs of plain text. "
    )
    big = (sentence * (200_000 // len(sentence) + 1))[:200_000]
    write(
        "bedrock_large_first_event.eventstream",
        message_start() + delta(big, 23),
    )


if __name__ == "__main__":
    main()

"""JSON on the hot paths: orjson where it gives the same value, json otherwise.

A build crosses JSON six times (three nested levels in, three out: the AMQP
body, oslo.messaging's ``oslo.message`` string, the cells ``message``
string), plus the journal payload and the instance record. With the
standard library that was about a quarter of the agent's CPU in the issue 3
benchmark; orjson does the same work several times faster.

What differs, and why it does not matter here:

* Output is compact (``{"a":1}``, not ``{"a": 1}``): the same JSON value;
  Nova and oslo.messaging parse it with ``json.loads``.
* orjson refuses what the standard library accepts: ``NaN`` and
  ``Infinity`` literals and lone surrogates when reading, integers beyond
  64 bits and nesting deeper than 254 levels when writing. Those cases fall
  back to the standard library, so every input gives the answer (or the
  error) it gave before.
* Non-string keys become strings, as with ``json.dumps``.
"""

import json

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value, default=None):
    """``json.dumps(value, default=default)`` as a str."""
    try:
        return orjson.dumps(value, default=default, option=_OPTIONS).decode("utf-8")
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, default=default)


def dumpb(value, default=None):
    """``dumps`` encoded in UTF-8 (an AMQP body)."""
    try:
        return orjson.dumps(value, default=default, option=_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, default=default).encode("utf-8")


def loads(text):
    """``json.loads(text)``: the same value, or the same ValueError/RecursionError."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)

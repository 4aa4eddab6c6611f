"""Hostile payloads (hypothesis strategies) and the harness that feeds them to Ember's handlers.

Every strategy here yields input that a correct handler must refuse: garbage bytes, msgpack that
is not a map, a valid message with one field dropped or given a value of the wrong type, a bad
envelope, tensors with a wrong dtype, shape, size or non-finite values, huge declared sizes. The
handler-specific suites add what only they can judge (bad signatures, replayed ids, another
agent's topic, a delta not shaped like the model).

:func:`feed` runs a strategy against one handler, the same coroutine the transport feeds, on the
test's event loop (hypothesis drives it from a worker thread), and checks each message's verdict:
exactly one refusal event in the structlog output, with a non-empty reason.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack
import numpy as np
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.protocol.msgpack_view import pack
from agent.protocol.topics import check_segment

T = TypeVar("T")
Encoder = Callable[[Mapping[str, Any]], bytes]

# -- values of the wrong kind ---------------------------------------------------------------------

KINDS = ("str", "name", "bytes", "int", "count", "float", "bool", "map", "list", "tensors")
"""What a field holds; :func:`wrong_value` draws something a field of that kind must refuse."""

_SCALARS: dict[str, st.SearchStrategy[Any]] = {
    "nil": st.none(),
    "bool": st.booleans(),
    "int": st.integers(min_value=-(2**63), max_value=2**64 - 1),
    "float": st.floats(allow_nan=True, allow_infinity=True),
    "str": st.text(max_size=40),
    "bytes": st.binary(max_size=40),
    "list": st.lists(st.integers(-(2**63), 2**63), max_size=4),
    "map": st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63), max_size=4),
}
_BAD_NAMES = st.sampled_from(["", "a/b", "+", "#", "$SYS", ".", "..", "x" * 129, "nul\0", "a/+/#"])
_NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def wrong_value(kind: str) -> st.SearchStrategy[Any]:
    """A value no field of ``kind`` accepts."""
    others = {
        "str": ["nil", "bool", "int", "float", "bytes", "list", "map"],
        "name": ["nil", "bool", "int", "float", "bytes", "list", "map"],
        "bytes": ["nil", "bool", "int", "float", "str", "list", "map"],
        "int": ["nil", "bool", "float", "str", "bytes", "list", "map"],
        "count": ["nil", "bool", "float", "str", "bytes", "list", "map"],
        "float": ["nil", "bool", "str", "bytes", "list", "map"],
        "bool": ["nil", "int", "float", "str", "bytes", "list", "map"],
        "map": ["nil", "bool", "int", "float", "str", "bytes", "list"],
        "list": ["nil", "bool", "int", "float", "str", "bytes", "map"],
        "tensors": ["nil", "bool", "int", "float", "str", "bytes", "map"],
    }[kind]
    options = [_SCALARS[k] for k in others]
    if kind == "name":
        options.append(_BAD_NAMES)
    if kind == "count":
        options.append(st.integers(min_value=-(2**63), max_value=-1))
    if kind == "float":
        options.append(_NON_FINITE)
    if kind == "tensors":
        options.append(st.lists(_SCALARS["int"], min_size=1, max_size=3))
    return st.one_of(options)


def _is_segment(text: str) -> bool:
    try:
        check_segment(text)
    except ValueError:
        return False
    return True


segments = st.text(min_size=1, max_size=20).filter(_is_segment)
"""Any string usable as one topic level (an agent, job or role name)."""


# -- payloads -------------------------------------------------------------------------------------

garbage = st.binary(max_size=600)
"""Random bytes: never a message (a valid one needs a map with v, type and id)."""

not_a_map = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=30),
    st.binary(max_size=30),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
).map(lambda value: msgpack.packb(value, use_bin_type=True))
"""Well-formed msgpack whose top level is not a map."""

json_garbage = st.one_of(
    st.sampled_from([b"{", b"{}", b'{"v": 1}', b"[1, 2]", b"null", b"\xff\xfe{", b'{"v": NaN}']),
    st.text(max_size=80).map(lambda text: ("{" + text).encode("utf-8", "surrogatepass")),
)
"""Payloads starting like JSON (the other encoding a message may have) that are not a message."""


def deep_nesting(depth: int = 5000) -> bytes:
    """A map nested far deeper than any limit (the reader must refuse it, not recurse)."""
    return b"\x81\xa1a" * depth + b"\xc0"


def with_wire(wire: Mapping[str, Any], encode: Encoder = pack, **changes: Any) -> bytes:
    """``wire`` with some fields replaced (:data:`DROP` drops one), encoded."""
    out = {k: v for k, v in wire.items() if k not in changes}
    out.update({k: v for k, v in changes.items() if v is not DROP})
    return encode(out)


def as_json(document: Mapping[str, Any]) -> bytes:
    """JSON as Python writes it (NaN and Infinity included); binary values become lists of
    ints, so a value of the wrong kind stays of the wrong kind."""
    return json.dumps(document, default=list).encode()


DROP = object()


def mutated(
    wire: Mapping[str, Any],
    fields: Mapping[str, str],
    optional: frozenset[str] = frozenset(),
    encode: Encoder = pack,
) -> st.SearchStrategy[bytes]:
    """``wire`` (a valid message's map) broken in one place: a required field dropped, a field
    given a value of the wrong kind (``fields`` names each field's kind, ``optional`` the ones
    with a default), or a bad envelope."""
    names = sorted(fields)
    required = sorted(set(fields) - optional)
    drop = (
        st.sampled_from(required).map(lambda name: with_wire(wire, encode, **{name: DROP}))
        if required
        else st.nothing()
    )
    retype = st.sampled_from(names).flatmap(
        lambda name: wrong_value(fields[name]).map(
            lambda value: with_wire(wire, encode, **{name: value})
        )
    )
    envelope = st.one_of(
        st.sampled_from([0, 2, -1, 99, "1", 1.0, True, None]).map(
            lambda v: with_wire(wire, encode, v=v)
        ),
        st.one_of(
            st.sampled_from(["", "nope", "pong", "signed_bundle", "rpc_response"]),
            wrong_value("str"),
        )
        .filter(lambda kind: kind != wire["type"])
        .map(lambda kind: with_wire(wire, encode, type=kind)),
        st.one_of(
            st.sampled_from(["", "a b", "x" * 257, "ü", "id/with/slash", "#"]), wrong_value("str")
        ).map(lambda msg_id: with_wire(wire, encode, id=msg_id)),
        st.sampled_from(["v", "type", "id"]).map(
            lambda key: with_wire(wire, encode, **{key: DROP})
        ),
    )
    return st.one_of(drop, retype, envelope)


def truncated(payload: bytes) -> st.SearchStrategy[bytes]:
    """A valid payload cut short, or with bytes appended."""
    cut = st.integers(1, max(1, len(payload) - 1)).map(lambda n: payload[:n])
    padded = st.binary(min_size=1, max_size=16).map(lambda extra: payload + extra)
    return st.one_of(cut, padded)


def undecodable(valid: bytes) -> st.SearchStrategy[bytes]:
    """Payloads no decoder can make a message of: garbage, msgpack that is not a map, JSON
    that is not a message, nesting deeper than any limit, ``valid`` cut short or padded."""
    return st.one_of(garbage, not_a_map, json_garbage, st.just(deep_nesting()), truncated(valid))


def broken_tensors(wire: Mapping[str, Any], key: str = "tensors") -> st.SearchStrategy[bytes]:
    """``wire[key]`` (a valid tensor list) with one tensor made malformed: an unknown dtype,
    data that does not fit the shape, a shape that is not a list of sizes, huge declared sizes,
    too many dimensions, NaN or ±inf values, a duplicate or missing name."""
    # Without the alignment padding (a marker the packer wants right before binary data).
    tensors = [{k: v for k, v in t.items() if k != "pad"} for t in wire[key]]

    def replace(index: int, **changes: Any) -> bytes:
        items = [dict(t) for t in tensors]
        items[index].update(changes)
        return with_wire(wire, **{key: items})

    def nonfinite(index: int, value: float, at: int) -> bytes:
        item = tensors[index]
        array = np.frombuffer(item["data"], dtype=item["dtype"]).copy()
        array.reshape(-1)[at % max(1, array.size)] = value
        return replace(index, data=array.tobytes())

    index = st.integers(0, len(tensors) - 1)
    return st.one_of(
        st.tuples(
            index, st.sampled_from(["float128", "complex64", "object", "", "<f4", "int4"])
        ).map(lambda a: replace(a[0], dtype=a[1])),
        st.tuples(index, wrong_value("str")).map(lambda a: replace(a[0], dtype=a[1])),
        st.tuples(index, st.binary(max_size=64))
        .filter(lambda a: len(a[1]) != len(tensors[a[0]]["data"]))
        .map(lambda a: replace(a[0], data=a[1])),
        st.tuples(index, wrong_value("list")).map(lambda a: replace(a[0], shape=a[1])),
        st.tuples(index, st.lists(st.integers(-5, -1), min_size=1, max_size=3)).map(
            lambda a: replace(a[0], shape=a[1])
        ),
        st.tuples(index, st.sampled_from([[2**31, 2**31], [2**40], [1 << 28, 2], [2**63]])).map(
            lambda a: replace(a[0], shape=a[1])
        ),
        index.map(lambda i: replace(i, shape=[1] * 9)),
        st.tuples(index, wrong_value("bytes")).map(lambda a: replace(a[0], data=a[1])),
        st.tuples(index, wrong_value("name")).map(lambda a: replace(a[0], name=a[1])),
        st.tuples(index, _NON_FINITE, st.integers(0, 10_000)).map(lambda a: nonfinite(*a)),
        index.map(lambda i: with_wire(wire, **{key: [*tensors, tensors[i]]})),
        st.tuples(index, st.sampled_from(["name", "dtype", "shape", "data"])).map(
            lambda a: replace(a[0], **{a[1]: None})
        ),
        st.just(with_wire(wire, **{key: [TINY] * 4097})),
    )


TINY = {"name": "t", "dtype": "float32", "shape": [0], "data": b""}
"""The smallest valid tensor map (for lists longer than the limit)."""


# -- the harness ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a handler logged for the hostile messages it was fed."""

    sent: int = 0
    events: Counter[str] = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)

    def add(self, event: str, reason: str) -> None:
        self.sent += 1
        self.events[event] += 1
        self.reasons.append(reason)

    def mention(self, text: str) -> int:
        """How many reasons contain ``text``."""
        return sum(text in reason for reason in self.reasons)


def fuzz_settings(examples: int) -> settings:
    """Exactly the examples asked for, fresh each run (no example database), no shrinking
    budget spent unless something fails."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )


async def feed(
    handler: Callable[[T], Awaitable[object]],
    strategy: st.SearchStrategy[T],
    examples: int,
    refusals: Mapping[str, str],
    explicit: Sequence[T] = (),
) -> Tally:
    """Feed ``examples`` hostile inputs from ``strategy`` to ``handler`` on this event loop,
    after every one of ``explicit`` (inputs a test counts on seeing: hypothesis spreads its
    examples over the strategy's branches unevenly, and a rare one may not come up at all).

    ``refusals`` maps each refusal event the handler may log to the field holding its reason.
    Every input must make the handler return normally after logging exactly one of them with a
    non-empty reason; anything else (an exception, no refusal, two) fails with the input.
    """
    loop = asyncio.get_running_loop()
    tally = Tally()
    with capture_logs() as logs:

        def one(shown: Shown[T]) -> None:
            before = len(logs)
            asyncio.run_coroutine_threadsafe(_call(handler, shown.item), loop).result(60)
            seen = [e for e in logs[before:] if e.get("event") in refusals]
            assert len(seen) == 1, (seen, [e.get("event") for e in logs[before:]])
            reason = seen[0].get(refusals[seen[0]["event"]])
            assert isinstance(reason, str), seen[0]
            assert reason, seen[0]
            tally.add(seen[0]["event"], reason)

        run = given(strategy.map(Shown))(one)
        for item in explicit:
            run = example(Shown(item))(run)
        await asyncio.to_thread(fuzz_settings(examples)(run))
    return tally


@dataclass(frozen=True)
class Shown(Generic[T]):
    """A hostile input with a short repr (a falsifying example may be a 40 KB update)."""

    item: T

    def __repr__(self) -> str:
        text = repr(self.item)
        return text if len(text) <= 600 else f"{text[:600]}... ({len(text)} characters)"


async def _call(handler: Callable[[T], Awaitable[object]], item: T) -> None:
    await handler(item)

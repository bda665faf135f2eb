"""The wire format: frames, out-of-band buffers, the handshake proofs."""

from __future__ import annotations

import io
import pickle
import socket
import threading

import pytest

from sky_jupyter import protocol as P

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


class _Pipe:
    """Both ends of a socketpair as FrameIOs."""

    def __init__(self) -> None:
        a, b = socket.socketpair()
        self.a = P.FrameIO(a.makefile("rb"), a.sendall, a.close)
        self.b = P.FrameIO(b.makefile("rb"), b.sendall, b.close)


def test_frames_round_trip_with_payload():
    pipe = _Pipe()
    pipe.a.send(P.TASK, 7, {"k": 1}, P.dumps({"x": [1, 2, 3]}))
    kind, task_id, meta, frames = pipe.b.recv()
    assert (kind, task_id, meta) == (P.TASK, 7, {"k": 1})
    assert P.loads(frames) == {"x": [1, 2, 3]}


def test_large_arrays_travel_out_of_band():
    np = pytest.importorskip("numpy")
    arr = np.arange(1_000_000, dtype=np.float64)
    frames = P.dumps(arr)
    assert len(frames) == 2 and memoryview(frames[1]).nbytes == arr.nbytes  # the data is its own buffer
    assert len(frames[0]) < 1000
    pipe = _Pipe()
    sender = threading.Thread(target=pipe.a.send, args=(P.RESULT, 1, None, frames))
    sender.start()
    _, _, _, got = pipe.b.recv()
    sender.join()
    assert (P.loads(got) == arr).all()


def test_concurrent_senders_do_not_interleave_frames():
    pipe = _Pipe()
    blob = b"y" * 200_000

    def send(k: int) -> None:
        for i in range(20):
            pipe.a.send(P.STREAM, k * 100 + i, None, [blob])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    seen = set()
    for _ in range(80):
        _, task_id, _, frames = pipe.b.recv()
        assert bytes(frames[0]) == blob
        seen.add(task_id)
    for t in threads:
        t.join()
    assert len(seen) == 80


def test_truncated_stream_is_eof():
    data = io.BytesIO(b"\x00\x00\x00\x10")
    with pytest.raises(EOFError):
        P.FrameIO(data, lambda b: None).recv()


def test_handshake_frames_are_json_and_bounded():
    pipe = _Pipe()
    pipe.a.send_json({"nonce": "abc"})
    assert pipe.b.recv_json() == {"nonce": "abc"}
    pipe.a.send(P.TASK, 1, None, [b"x"])  # a pickle frame where JSON belongs is refused, not loaded
    with pytest.raises(ValueError):
        pipe.b.recv_json()


def test_proof_depends_on_secret_both_nonces_and_direction():
    proof = P.proof("s3cret", P.CLIENT, "n1", "m1")
    assert P.check_proof("s3cret", P.CLIENT, "n1", "m1", proof)
    assert not P.check_proof("s3cret", P.CLIENT, "n2", "m1", proof)
    assert not P.check_proof("s3cret", P.CLIENT, "n1", "m2", proof)
    assert not P.check_proof("other", P.CLIENT, "n1", "m1", proof)
    assert not P.check_proof("s3cret", P.WORKER, "n1", "m1", proof)  # an answer reflected back fails
    assert not P.check_proof("s3cret", P.CLIENT, "n1", "m1", None)


def test_versions_name_python_and_cloudpickle():
    import cloudpickle

    v = P.versions()
    assert v["cloudpickle"] == cloudpickle.__version__ and v["python"].count(".") == 1
    assert pickle.HIGHEST_PROTOCOL >= 5


def test_the_handshake_types_name_the_fields_each_side_checks():
    """The TypedDicts the type checker sees and the checks a peer's frames pass describe the same frames."""
    assert set(P.Hello.__annotations__) == set(P.HELLO_FIELDS)
    assert set(P.Answer.__annotations__) == set(P.ANSWER_FIELDS)
    assert set(P.Reply.__annotations__) == set(P.REPLY_FIELDS) | {"error"}  # error: only when ok is false
    assert set(P.WorkerState.__annotations__) | set(P.Versions.__annotations__) | {"ok", "mac"} == set(P.REPLY_FIELDS)


def test_message_kinds_are_the_literal_types():
    from typing import get_args

    client, worker = set(get_args(P.ClientKind)), set(get_args(P.WorkerKind))
    assert client == {P.TASK, P.CELL, P.SETUP, P.PULL, P.INTERRUPT, P.PING, P.SHUTDOWN, P.ACK, P.SHARED,
                      P.INPUT_REPLY}
    assert worker == {P.RESULT, P.ERROR, P.STREAM, P.DISPLAY, P.PONG, P.NOTICE, P.ITEM, P.INPUT_REQUEST}
    assert not client & worker

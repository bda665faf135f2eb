"""The worker's half of the mutual authentication of :mod:`sky_jupyter.protocol` (the client's is in
:class:`sky_jupyter.node.WorkerLink`): the client proves it knows the pool secret, then this worker does, and only
then does it say who it is. Nothing from the peer is unpickled before that; every field it sends is checked."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from .. import protocol as P
from .output import log


class _Deadline:
    """``readinto`` on a socket that fails once ``seconds`` have passed, however slowly the peer sends."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock
        self._end = time.monotonic() + seconds

    def readinto(self, buffer: bytearray | memoryview, /) -> int:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the handshake took too long")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


def authenticate(sock: socket.socket, secret: str, timeout: float, state: Callable[[], P.WorkerState]) -> bool:
    """Run the handshake on a new connection, within ``timeout`` seconds; whether it may carry frames.

    ``state`` says who this worker is (pid, generation, held tasks, frame limits...): asked for only once the
    client has proven it knows ``secret``, and sent only together with this worker's own proof.
    """
    wire = P.FrameIO(_Deadline(sock, timeout), sock.sendall)
    worker_nonce = P.new_nonce()
    hello: P.Hello = {"sky": P.PROTOCOL_VERSION, "nonce": worker_nonce}
    wire.send_json(hello)
    answer = wire.recv_json(P.HELLO_LIMIT)
    P.check_fields(answer, {k: P.ANSWER_FIELDS[k] for k in ("nonce", "mac")}, "the client's answer")
    if not P.check_proof(secret, P.CLIENT, worker_nonce, answer["nonce"], answer["mac"]):
        refusal: P.Refusal = {"ok": False, "error": "authentication failed: wrong pool secret"}
        wire.send_json(refusal)
        log("refused a connection: the client did not prove it knows the pool secret")
        return False
    P.check_fields(answer, P.ANSWER_FIELDS, "the client's answer")
    mine = P.versions()
    ok = all(answer[k] == v for k, v in mine.items())
    reply: P.Reply = {"ok": ok, "mac": P.proof(secret, P.WORKER, worker_nonce, answer["nonce"]), **mine, **state()}
    if not ok:
        reply["error"] = (f"version mismatch: worker has {mine}, client has "
                          f"{ {k: answer[k] for k in mine} }")
        log(f"refused a client: {reply['error']}")
    wire.send_json(reply)
    sock.settimeout(None)
    return ok

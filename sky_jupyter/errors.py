"""The error hierarchy. Every message names the thing that failed and the next step."""

from __future__ import annotations


class SkyError(Exception):
    """Root of every error sky_jupyter raises on purpose."""


class ConfigError(SkyError, ValueError):
    """The user asked for something that cannot work (bad option, unknown name, missing token)."""


class ProvisionError(SkyError):
    """Machines could not be started or reached."""


class BootstrapError(SkyError):
    """A bootstrap phase failed on a node."""

    def __init__(self, node: str, phase: str, exit_code: int, tail: str, log: str = "") -> None:
        self.node, self.phase, self.exit_code, self.tail = node, phase, exit_code, tail
        #: Where the node's full bootstrap log is, in words: the provider knows (a Local node keeps it in its folder).
        self.log = log or "~/.sky_jupyter/bootstrap.log on the node"
        # The core phases say what to do in their own last line, and so does any phase whose last line is an
        # "error: ..." (a rejected HF token says to set a valid one); other failures of a plugin's phase or an
        # image's package are for whoever wrote them.
        said = tail.strip().splitlines()[-1].startswith("error:") if tail.strip() else False
        advice = ("" if phase in ("env", "uv", "venv") or said
                  else "Fix the image or plugin that adds this phase, then run the pool again ")
        super().__init__(
            f"bootstrap phase {phase!r} failed on {node} (exit code {exit_code}); last lines:\n{tail}\n"
            f"{advice}(the full log is {self.log})."
        )


class ConnectionLostError(SkyError, ConnectionError):
    """The connection to a node's worker broke and could not be restored."""


class WorkerLostError(ConnectionLostError):
    """A node's worker process died; its remote namespace is gone."""


class SpotReclaimError(ConnectionLostError):
    """EC2 announced that it takes a spot node back: what ran there is lost, and the node takes no more work."""


class VersionMismatchError(SkyError):
    """Client and worker run different Python or cloudpickle versions."""


class AuthenticationError(SkyError):
    """A worker refused our pool secret (or we reached something that is not our worker)."""


class SerializationError(SkyError, TypeError):
    """A value could not be pickled to send to a node, or a result could not be unpickled here."""


class RemoteError(SkyError):
    """A remote exception whose type cannot be recreated here; carries the type name and traceback."""

    def __init__(self, type_name: str, message: str, traceback: str = "", node: str = "") -> None:
        self.type_name, self.message, self.traceback, self.node = type_name, message, traceback, node
        where = f" on {node}" if node else ""
        super().__init__(f"{type_name}: {message} (raised{where})")

    def __reduce__(self):  # keep all fields through pickling
        return (type(self), (self.type_name, self.message, self.traceback, self.node))


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of a re-raised remote exception so the remote traceback is printed."""

    def __init__(self, tb: str) -> None:
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'

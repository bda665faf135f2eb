"""``sky.plugins.huggingface(token=...)``: the HuggingFace libraries on every node, and the node logged into the Hub.

The image gains ``transformers``, ``datasets``, ``tokenizers``, ``accelerate`` and ``huggingface_hub`` (the ones it
does not list already), ``HF_TOKEN`` (a secret: redacted everywhere, kept out of scripts and command lines) and
``HF_ENDPOINT`` when one is given or set here. A bootstrap phase logs each node in once, so that
``from_pretrained()`` of gated repos works with no login code in the user's function:

* the token reaches the login from the environment, never from a command line (it would show in ``ps``);
* the login validates the token online under a timeout (``huggingface_hub`` has none of its own);
* a rejected token (401/403) fails the bootstrap with a message saying what to do;
* the token file ``$HF_HOME/token`` (0600, folder 0700) is written by the phase itself, also when the Hub is
  unreachable (refused, timed out, hanging, 5xx: then with a warning line in the bootstrap output);
* the token file and the env file leave an SSH or AWS node when its last pool closes, and every later bring-up
  writes them again (the bootstrap marker skips the login: the token is checked once).

Without ``token=``, the token comes from the notebook panel (the notebook layer passes it as ``token=``), then
``HF_TOKEN`` here, then this machine's Hub credential store. No token at all is a :class:`~sky_jupyter.ConfigError`
when the plugin is created, before anything is provisioned.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path

from ..bootstrap import HUB_TOKEN_FILE, WRITE_HUB_TOKEN
from ..errors import ConfigError
from ..image import Image
from ..plugin import Cluster, Plugin
from ..redaction import register

#: What the image gains: the seed's three libraries plus what they need to train and to log in.
PACKAGES = ("transformers", "datasets", "tokenizers", "accelerate", "huggingface_hub")

#: Exit code of the login snippet when the Hub rejected the token (every other failure means "unreachable").
REJECTED = 3

# Runs on the node with the node's interpreter. It holds no secret: the token comes from $HF_TOKEN. Checks the token
# with the Hub (whoami, as `hf auth login` does, but writing nothing: the phase writes the token file itself, and no
# `stored_tokens` copy is left behind). Prints one line saying what happened and exits 0 (the token is good),
# REJECTED (401/403) or another code (the Hub unreachable).
_LOGIN = r'''
import os, signal, sys

timeout = float(sys.argv[1])
for name, value in (("HF_HUB_DISABLE_UPDATE_CHECK", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                    ("HF_HUB_VERBOSITY", "error")):
    os.environ.setdefault(name, value)

class NoAnswer(BaseException):  # not an Exception: HTTP libraries must not catch and retry it
    pass

def give_up(signum, frame):
    raise NoAnswer(f"no answer within {timeout:g} s")

signal.signal(signal.SIGALRM, give_up)
signal.setitimer(signal.ITIMER_REAL, timeout)
try:
    from huggingface_hub import constants, whoami
    from huggingface_hub.errors import HfHubHTTPError
except ImportError as exc:
    print(f"huggingface_hub is not importable by {sys.executable} ({exc})")
    sys.exit(4)
endpoint = constants.ENDPOINT  # HF_ENDPOINT, else the Hub itself

def login(token):  # huggingface_hub's login() checks the token the same way, then also writes stored_tokens
    whoami(token=token)

try:
    login(token=os.environ["HF_TOKEN"])
except HfHubHTTPError as exc:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        print(f"error: the Hub at {endpoint} rejected the HF token (HTTP {status}): it is wrong, expired or "
              f"revoked. Create a token at {endpoint}/settings/tokens (read access is enough) and pass it as "
              f"sky.plugins.huggingface(token=...), set HF_TOKEN, or enter it in the panel; then start the pool again.")
        sys.exit(3)
    print(f"the Hub at {endpoint} answered HTTP {status} to the token check")
    sys.exit(2)
except NoAnswer:
    print(f"the Hub at {endpoint} did not answer within {timeout:g} s")
    sys.exit(2)
except BaseException as exc:  # refused, DNS, TLS: the Hub is unreachable from here
    print(f"the Hub at {endpoint} is unreachable ({type(exc).__name__}: {str(exc)[:200]})")
    sys.exit(2)
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
print(f"logged in to {endpoint}")
'''


def _requirement_name(spec: str) -> str:
    name = spec.strip()
    for stop in "[<>=!~;@ ":
        name = name.split(stop, 1)[0]
    return name.lower().replace("_", "-").replace(".", "-")


def check_token(token: object, source: str) -> str:
    """The token, stripped of surrounding whitespace, if it looks like a token; else a ConfigError that names the
    problem and where the token came from, never the token itself."""
    if not isinstance(token, str):
        raise ConfigError(f"the HuggingFace token from {source} must be a string, not {type(token).__name__}.")
    token = token.strip()
    if not token:
        raise ConfigError(f"the HuggingFace token from {source} is empty; create one on "
                          f"the Hub (Settings > Access Tokens) and pass it as sky.plugins.huggingface(token=...).")
    if any(c.isspace() for c in token):
        raise ConfigError(f"the HuggingFace token from {source} contains whitespace, so it is not a token (was "
                          f"more than the token pasted?); copy it again from the Hub (Settings > Access Tokens).")
    if not token.isprintable() or not token.isascii():
        raise ConfigError(f"the HuggingFace token from {source} contains control or non-ASCII characters, so it "
                          f"is not a token; copy it again from the Hub (Settings > Access Tokens).")
    return token


def _stored_token() -> str | None:
    """This machine's Hub credential store, through ``huggingface_hub`` when installed, else its token file."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        path = Path(os.path.expanduser(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")))
        try:
            return path.read_text().strip() or None
        except OSError:
            return None
    return get_token()


def find_token(token: str | None = None) -> str:
    """The token to use: ``token`` (the argument, or the panel's), then ``HF_TOKEN``, then the local store."""
    if token is not None:
        return check_token(token, "token=")
    if os.environ.get("HF_TOKEN"):
        return check_token(os.environ["HF_TOKEN"], "the HF_TOKEN environment variable")
    stored = _stored_token()
    if stored:
        return check_token(stored, "the local Hub credential store (hf auth login)")
    raise ConfigError(
        "sky.plugins.huggingface needs a HuggingFace token and found none: not passed as token=, not set in the "
        "panel, no HF_TOKEN environment variable, and no token stored by `hf auth login` on this machine. Create "
        "one on the Hub (Settings > Access Tokens) and pass it as sky.plugins.huggingface(token=...), or "
        "set it in the %sky panel. Nothing was started."
    )


def _check_endpoint(endpoint: object, source: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.strip().startswith(("http://", "https://")):
        raise ConfigError(f"the Hub endpoint from {source} must be an http(s) URL such as "
                          f"http://hub-mirror.internal:8080, got {endpoint!r}.")
    return endpoint.strip().rstrip("/")


def login_phase(login_timeout: float, fingerprint: str) -> str:
    """The bootstrap phase: check $HF_TOKEN with the Hub under a timeout, then write the token file (also when the
    Hub is unreachable, with a warning). The file leaves the node when its last pool closes, and each later
    bring-up writes it again from the env file (:func:`sky_jupyter.bootstrap.restore_hub_token`)."""
    snippet = shlex.quote(_LOGIN)
    hard_stop = int(login_timeout) + 15
    return f"""\
# Log this node into the Hub once. The token comes from $HF_TOKEN (the 0600 env file), never from a command line.
# Token fingerprint {fingerprint}: a new token or endpoint changes this script, so the node logs in again.
if [ -z "${{HF_TOKEN:-}}" ]; then echo "error: HF_TOKEN is not set on this node; the env file is missing it"; exit 1; fi
py="${{SKY_PYTHON:-}}"
if [ -z "$py" ] && [ -x "$SKY_HOME/venv/bin/python" ]; then py="$SKY_HOME/venv/bin/python"; fi
if [ -z "$py" ]; then py="$(command -v python3 || command -v python || true)"; fi
{HUB_TOKEN_FILE}
rc=0
if [ -z "$py" ]; then
  why="this node has no Python to run the login with"; rc=4
elif command -v timeout >/dev/null; then
  why=$(timeout -k 5 {hard_stop} "$py" -c {snippet} {login_timeout:g} 2>&1) || rc=$?
else
  why=$("$py" -c {snippet} {login_timeout:g} 2>&1) || rc=$?
fi
if [ "$rc" -eq {REJECTED} ]; then echo "$why"; exit {REJECTED}; fi
{WRITE_HUB_TOKEN}
if [ "$rc" -eq 0 ]; then
  echo "$why"
else
  [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || why="the Hub did not answer within {login_timeout:g} s"
  echo "warning: could not check the HF token online ($(printf '%s' "$why" | tail -n 1)); wrote it to $token_file" \\
       "unchecked. Gated downloads fail with 401 later if the token is wrong."
fi
echo "token file: $token_file (mode 0600)"
"""


def huggingface(token: str | None = None, endpoint: str | None = None, login_timeout: float = 30) -> Plugin:
    """HuggingFace libraries, ``HF_TOKEN`` and a Hub login on every node.

    ``token``: the Hub token (default: the panel's, then ``HF_TOKEN``, then the local credential store).
    ``endpoint``: a Hub mirror or test server (default: ``HF_ENDPOINT`` here, if set). ``login_timeout``: seconds
    the node waits for the Hub to check the token before it writes the credential file unchecked.
    """
    if isinstance(login_timeout, bool) or not isinstance(login_timeout, int | float) or not login_timeout > 0:
        raise ConfigError(f"login_timeout must be a positive number of seconds, got {login_timeout!r}.")
    token = find_token(token)
    register(token)
    explicit_endpoint = endpoint is not None
    if endpoint is not None:
        endpoint = _check_endpoint(endpoint, "endpoint=")
    elif os.environ.get("HF_ENDPOINT"):
        endpoint = _check_endpoint(os.environ["HF_ENDPOINT"], "the HF_ENDPOINT environment variable")
    fingerprint = hashlib.sha256(f"sky_jupyter-hf\0{token}\0{endpoint}".encode()).hexdigest()[:12]

    def transform(image: Image, cluster: Cluster) -> Image:
        listed = {_requirement_name(p) for p in image.pip}
        image = image.with_pip(*(p for p in PACKAGES if _requirement_name(p) not in listed))
        env = {"HF_TOKEN": token}
        # endpoint= beats the image's HF_ENDPOINT, which beats the one set on this machine.
        if endpoint is not None and (explicit_endpoint or "HF_ENDPOINT" not in image.environ):
            env["HF_ENDPOINT"] = endpoint
        return image.with_env(**env)

    def bootstrap(cluster: Cluster) -> list[str]:
        return [login_phase(float(login_timeout), fingerprint)]

    return (Plugin.create("huggingface").with_transform(transform).with_bootstrap(bootstrap)
            .with_secrets("HF_TOKEN"))

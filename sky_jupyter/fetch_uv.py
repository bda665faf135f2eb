"""Give a node a uv built for its own platform, with nothing but the node's python3 standard library.

Fresh OS images have python3 but no pip (and Debian's system Python refuses ``pip install`` anyway, PEP 668), and
a client of another platform (a Mac, an aarch64 laptop) cannot upload its own uv. So the node reads the ``uv``
project page of the pool's package index (PEP 691 JSON or PEP 503 HTML), picks the wheel whose platform tag fits
``uname -s -m`` and its C library, checks its sha256, and unpacks the ``uv`` binary from it.

The bootstrap runs this file's source with ``python3 - DEST`` (any Python 3.8 or later); settings come from the
environment, so no URL (credentials included) is on a command line:

- ``SKY_UV_INDEXES``: index URLs to try in order, space-separated (the pool's index first).
- ``SKY_UV_VERSION``: the uv version to take when the index has it (the client's own), else the newest release.

It prints one line naming what it installed, or one line saying what failed and exits 1 (the bootstrap then asks
the client for its own uv, or says what to do).
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import json
import os
import platform
import re
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile

TIMEOUT_S = 60
JSON_TYPE = "application/vnd.pypi.simple.v1+json"
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(?:-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)"
                    r"-(?P<plat>[^-]+)\.whl$")
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
#: ``uname -m`` spellings to the architecture names in wheel tags.
_ARCH = {"arm64": "aarch64", "amd64": "x86_64", "i386": "i686", "armv8l": "aarch64"}


def shown(url: str) -> str:
    """``url`` without its password (safe for messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def platform_tags(system: str, machine: str, libc: tuple[str, str]) -> tuple[str, str, tuple[int, int] | None]:
    """(kind, arch, libc version) a wheel must fit: kind is "manylinux" (glibc) or "musllinux"."""
    if system != "Linux":
        raise LookupError(f"nodes must run Linux; this one runs {system} {machine}")
    arch = _ARCH.get(machine, machine)
    name, version = libc
    if name == "glibc":
        nums = re.match(r"(\d+)\.(\d+)", version)
        return "manylinux", arch, (int(nums[1]), int(nums[2])) if nums else None
    return "musllinux", arch, None


def fits(filename: str, kind: str, arch: str, libc: tuple[int, int] | None) -> bool:
    """Whether a wheel file name carries a platform tag this node can run."""
    m = _WHEEL.match(filename)
    if m is None:
        return False
    for tag in m["plat"].split("."):
        if not tag.endswith("_" + arch):
            continue
        base = tag[: -len(arch) - 1]
        if kind == "manylinux":
            if base in _LEGACY_MANYLINUX:
                needed = _LEGACY_MANYLINUX[base]
            else:
                nums = re.fullmatch(r"manylinux_(\d+)_(\d+)", base)
                if nums is None:
                    continue
                needed = (int(nums[1]), int(nums[2]))
            if libc is None or needed <= libc:
                return True
        elif re.fullmatch(r"musllinux_\d+_\d+", base):
            return True
    return False


def _release(version: str) -> tuple[int, ...] | None:
    """The numeric release of a final version ("0.9.5" -> (0, 9, 5)); None for pre-releases and the like."""
    return tuple(int(x) for x in version.split(".")) if re.fullmatch(r"\d+(\.\d+)*", version) else None


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.files: list[dict[str, object]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "a":
            return
        a = dict(attrs)
        href = a.get("href")
        if href:
            self.files.append({"url": href, "yanked": "data-yanked" in a})


def parse_page(body: bytes, content_type: str, base: str) -> list[dict[str, object]]:
    """The files of a project page: dicts with ``filename``, absolute ``url``, ``sha256`` (or None), ``yanked``."""
    if content_type.split(";")[0].strip() == JSON_TYPE:
        raw = [{"url": f["url"], "sha256": (f.get("hashes") or {}).get("sha256"), "yanked": bool(f.get("yanked"))}
               for f in json.loads(body)["files"]]
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        raw = parser.files
    files = []
    for f in raw:
        url = urllib.parse.urljoin(base, str(f["url"]))
        path, _, fragment = url.partition("#")
        sha = f.get("sha256") or (fragment[7:] if fragment.startswith("sha256=") else None)
        files.append({"filename": urllib.parse.unquote(path.rsplit("/", 1)[-1]), "url": path, "sha256": sha,
                      "yanked": f["yanked"]})
    return files


def wheel_version(filename: str) -> str:
    """The version in a wheel's file name."""
    match = _WHEEL.match(filename)
    if match is None:
        raise ValueError(f"{filename!r} is not the file name of a wheel")
    return match["version"]


def choose(files: list[dict[str, object]], kind: str, arch: str, libc: tuple[int, int] | None,
           want: str | None) -> dict[str, object] | None:
    """The uv wheel for this platform: version ``want`` when listed, else the newest release; None if none fits."""
    fitting = [f for f in files if not f["yanked"] and fits(str(f["filename"]), kind, arch, libc)]
    for f in fitting:
        if want and wheel_version(str(f["filename"])) == want:
            return f
    releases = [(r, f) for f in fitting
                if (r := _release(wheel_version(str(f["filename"])))) is not None]
    return max(releases, key=lambda pair: pair[0])[1] if releases else None


def _request(url: str, accept: str | None = None) -> urllib.request.Request:
    """A request with the URL's credentials moved into an Authorization header (urllib ignores them in URLs),
    kept off redirects to other hosts (signed storage URLs refuse them)."""
    parts = urllib.parse.urlsplit(url)
    clean = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    req = urllib.request.Request(clean)
    if parts.username is not None:
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        req.add_unredirected_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    if accept:
        req.add_header("Accept", accept)
    return req


def _with_credentials(url: str, index: str) -> str:
    """Files on the index's own host get the index's credentials."""
    i, u = urllib.parse.urlsplit(index), urllib.parse.urlsplit(url)
    if i.username is not None and u.username is None and u.netloc == i.netloc.rsplit("@", 1)[-1]:
        return urllib.parse.urlunsplit(u._replace(netloc=i.netloc))
    return url


def fetch(index: str, dest: str, want: str | None, kind: str, arch: str, libc: tuple[int, int] | None) -> str:
    """Download and unpack uv from ``index`` into ``dest``; returns its version."""
    page = index.rstrip("/") + "/uv/"
    accept = f"{JSON_TYPE}, text/html;q=0.1"
    with urllib.request.urlopen(_request(page, accept), timeout=TIMEOUT_S) as resp:
        files = parse_page(resp.read(), resp.headers.get("Content-Type", ""), resp.geturl())
    wheel = choose(files, kind, arch, libc, want)
    if wheel is None:
        raise LookupError(f"it lists no uv wheel for {kind} {arch} ({len(files)} files)")
    tmp_wheel = f"{dest}.whl.{os.getpid()}"
    try:
        digest = hashlib.sha256()
        url = _with_credentials(str(wheel["url"]), index)
        with urllib.request.urlopen(_request(url), timeout=TIMEOUT_S) as resp, open(tmp_wheel, "wb") as out:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if wheel["sha256"] and digest.hexdigest() != wheel["sha256"]:
            raise ValueError(f"{wheel['filename']} does not match the sha256 the index gives")
        with zipfile.ZipFile(tmp_wheel) as zf:
            member = next((n for n in zf.namelist() if re.fullmatch(r"[^/]+\.data/scripts/uv", n)), None)
            if member is None:
                raise LookupError(f"{wheel['filename']} holds no uv binary")
            tmp = f"{dest}.{os.getpid()}"
            with zf.open(member) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp_wheel):
            os.unlink(tmp_wheel)
    return wheel_version(str(wheel["filename"]))


def main(argv: list[str]) -> int:
    dest = argv[1]
    indexes = os.environ.get("SKY_UV_INDEXES", "").split()
    want = os.environ.get("SKY_UV_VERSION") or None
    uname = f"{platform.system()} {platform.machine()}"
    if not indexes:
        print(f"this node ({uname}) has no uv and no package index to fetch one from; set "
              f"Image(index_url=...) or install uv on the node", file=sys.stderr)
        return 1
    try:
        kind, arch, libc = platform_tags(platform.system(), platform.machine(), platform.libc_ver())
    except LookupError as exc:
        print(f"cannot fetch uv: {exc}", file=sys.stderr)
        return 1
    reasons = []
    for index in indexes:
        try:
            version = fetch(index, dest, want, kind, arch, libc)
        except (OSError, LookupError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            reason = f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError) else exc
            reasons.append(f"{shown(index)}: {reason}")
            continue
        print(f"uv {version} for {uname} ({kind} {arch}) from {shown(index)}")
        return 0
    print(f"could not download uv for this node ({uname}): {'; '.join(reasons)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

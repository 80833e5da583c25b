"""Lab devices over SSH: upload the model and the self-contained runner, run it, fetch its JSON, clean up.

The only module that imports asyncssh. Host keys are checked against known_hosts (the user's, or --known-hosts)
unless the caller explicitly accepts any key. Every remote command is a list of arguments joined with shlex; no
user text is ever spliced into a shell string. The remote temp dir is removed in a `finally`, on failure too.
`SshTransport` is a lab device's RunnerTransport (profiling/transport.py).
Layering: imports errors, profiling.transport and profiling.local (the runner spec and result helpers) only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgecompress.errors import (
    DeviceAuthError,
    DeviceMissingRuntime,
    DeviceUnreachable,
    DeviceURLError,
    HostKeyError,
    ProfileError,
)
from edgecompress.profiling.local import RUNNER, parse_runner_output
from edgecompress.profiling.transport import RunnerRun, job_spec, model_files, out_of_memory

log = logging.getLogger(__name__)

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
RUNTIME_HINT = "run `pip install onnxruntime numpy` on the device, or point --remote-python at a python that has them"
# prints the versions the runner needs, or exits 1 naming what is missing (stdlib only: runs before any upload)
_PROBE = ("import json, platform, sys\n"
          "try:\n    import numpy, onnxruntime\n"
          "except ImportError as e:\n    print(json.dumps({'missing': e.name})); sys.exit(1)\n"
          "print(json.dumps({'python': platform.python_version(), 'machine': platform.machine(),"
          " 'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__}))")


@dataclass(frozen=True)
class DeviceURL:
    user: str
    host: str
    port: int = 22

    @property
    def name(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"ssh://{self.name}"


_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def parse_device_url(url: str) -> DeviceURL:
    """ssh://user@host[:port] (IPv6 in brackets). Anything else is a DeviceURLError naming what is wrong."""
    example = "expected ssh://user@host[:port], e.g. ssh://pi@192.168.1.20 or ssh://pi@raspberrypi.local:2222"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise DeviceURLError(f"malformed device URL '{url}': {e}", hint=example) from None
    if parts.scheme != "ssh":
        raise DeviceURLError(f"malformed device URL '{url}': the scheme must be ssh://", hint=example)
    if parts.password is not None:
        raise DeviceURLError(f"malformed device URL '{url}': passwords in URLs are not supported",
                             hint="use a key (--identity FILE or ssh-agent)")
    if not parts.username or not _USER_RE.match(parts.username):
        raise DeviceURLError(f"malformed device URL '{url}': it needs a user name", hint=example)
    host = parts.hostname or ""
    if not host or not (_HOST_RE.match(host) or ":" in host):  # ":" only survives urlsplit inside [IPv6]
        raise DeviceURLError(f"malformed device URL '{url}': no valid host", hint=example)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise DeviceURLError(f"malformed device URL '{url}': no path, query or fragment allowed", hint=example)
    if port == 0:
        raise DeviceURLError(f"malformed device URL '{url}': port 0", hint=example)
    return DeviceURL(parts.username, host, port or 22)


@dataclass(frozen=True)
class DeviceOptions:
    url: DeviceURL
    known_hosts: Path | None = None  # default ~/.ssh/known_hosts
    insecure_accept_host_key: bool = False
    identity: tuple[Path, ...] = ()  # client keys; empty: asyncssh's defaults (~/.ssh/id_*, ssh-agent)
    remote_python: str = "python3"
    connect_timeout_s: float = 10.0
    run_timeout_s: float = 600.0
    remote_tmp: str = "/tmp"  # the per-run directory is made under it with mktemp -d


@dataclass
class DeviceRun:
    """What the device returned (the runner's JSON) and what happened around it."""

    result: dict[str, Any]
    device: str
    remote_python: str
    remote_dir: str = ""
    removed: bool = False  # the remote temp dir is gone
    warnings: list[str] = field(default_factory=list)


def profile_on_device(model_path: Path, spec: dict[str, Any], dev: DeviceOptions) -> DeviceRun:
    """Run the runner on `spec` on the device (spec's "model" is replaced by the uploaded copy's path)."""
    return asyncio.run(_profile(model_files(model_path), spec, dev))


@dataclass
class SshTransport:
    """A lab device's RunnerTransport: the files and runner.py uploaded into a fresh remote temp dir (removed
    afterwards, on failure too), the runner run with the device's python, its JSON fetched."""

    dev: DeviceOptions
    on_device: bool = True

    def run(self, files: list[Path], spec: dict[str, Any]) -> RunnerRun:
        r = asyncio.run(_profile(files, spec, self.dev))
        return RunnerRun(r.result, device={"device": r.device, "url": str(self.dev.url),
                                           "remote_python": r.remote_python, "remote_dir_removed": r.removed},
                         warnings=r.warnings)


def _known_hosts(dev: DeviceOptions, warnings: list[str]) -> Any:
    import asyncssh

    if dev.insecure_accept_host_key:
        msg = (f"INSECURE: accepting any host key from {dev.url.host}:{dev.url.port} "
               "(--insecure-accept-host-key): anyone on the path can impersonate the device")
        log.warning(msg)
        warnings.append(msg)
        return None
    path = (dev.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
    if not path.is_file():
        raise HostKeyError(f"cannot verify {dev.url.host}:{dev.url.port}: no known_hosts file at {path}",
                           hint=_keyscan_hint(dev, path))
    try:
        return asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError) as e:
        raise HostKeyError(f"cannot read known_hosts {path}: {e}") from None


def _keyscan_hint(dev: DeviceOptions, path: Path) -> str:
    port = [] if dev.url.port == 22 else ["-p", str(dev.url.port)]
    return (f"check the device's key fingerprint, then add it: {shlex.join(['ssh-keyscan', *port, dev.url.host])} "
            f">> {path}")


def _host_key_error(dev: DeviceOptions, known: Any) -> HostKeyError:
    path = (dev.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
    listed = False
    try:
        trusted = known.match(dev.url.host, "", dev.url.port)[0]
        listed = bool(trusted)
    except Exception:  # match's shape varies across asyncssh versions; the message is still right without it
        pass
    if listed:
        return HostKeyError(f"host key of {dev.url.host}:{dev.url.port} does NOT match {path}: refusing to connect "
                            "(the device was reinstalled, or someone is impersonating it)",
                            hint="if the device really changed, remove its old line from known_hosts and re-add it")
    return HostKeyError(f"host key of {dev.url.host}:{dev.url.port} is not in {path}", hint=_keyscan_hint(dev, path))


async def _connect(dev: DeviceOptions, warnings: list[str]) -> Any:
    import asyncssh

    known = _known_hosts(dev, warnings)
    kwargs: dict[str, Any] = {"port": dev.url.port, "username": dev.url.user, "known_hosts": known,
                              "connect_timeout": dev.connect_timeout_s, "login_timeout": dev.connect_timeout_s}
    if dev.identity:
        kwargs["client_keys"] = [str(p) for p in dev.identity]
        kwargs["agent_path"] = None  # exactly the keys asked for
    target = f"{dev.url.host}:{dev.url.port}"
    try:
        return await asyncssh.connect(dev.url.host, **kwargs)
    except asyncssh.HostKeyNotVerifiable:
        raise _host_key_error(dev, known) from None
    except asyncssh.PermissionDenied:
        raise DeviceAuthError(f"{dev.url.name} refused our key (authentication failed)",
                              hint="add your public key to the device's ~/.ssh/authorized_keys, or --identity FILE"
                              ) from None
    except asyncssh.KeyImportError as e:
        raise DeviceAuthError(f"cannot use the client key: {e}", hint="--identity FILE with an unencrypted key "
                              "or ssh-agent") from None
    except (asyncio.TimeoutError, TimeoutError):
        raise DeviceUnreachable(f"cannot reach {target}: no SSH answer within {dev.connect_timeout_s:g} s",
                                hint="is the device on and on this network? raise --connect-timeout") from None
    except asyncssh.Error as e:
        raise DeviceUnreachable(f"cannot reach {target}: {e.reason or type(e).__name__}") from None
    except OSError as e:
        raise DeviceUnreachable(f"cannot reach {target}: {e.strerror or e}",
                                hint="check the host and port; is sshd running there?") from None


async def _run(conn: Any, argv: list[str], timeout: float | None) -> Any:
    return await conn.run(shlex.join(argv), check=False, timeout=timeout)


async def _profile(files: list[Path], spec: dict[str, Any], dev: DeviceOptions) -> DeviceRun:
    """files: the model first, then its external data (uploaded beside it), then any other file (by name)."""
    import asyncssh

    warnings: list[str] = []
    conn = await _connect(dev, warnings)
    run = DeviceRun(result={}, device=dev.url.name, remote_python=dev.remote_python, warnings=warnings)
    short = max(10.0, dev.connect_timeout_s)
    try:
        async with conn:
            probe = await _run(conn, [dev.remote_python, "-c", _PROBE], short)
            if probe.exit_status == 127:
                raise DeviceMissingRuntime(f"{dev.url.name} has no '{dev.remote_python}'", hint=RUNTIME_HINT)
            info = parse_runner_output(str(probe.stdout or ""))
            if probe.exit_status != 0 or info is None or "missing" in info:
                missing = (info or {}).get("missing") or "numpy/onnxruntime"
                raise DeviceMissingRuntime(f"{dev.url.name}: {dev.remote_python} cannot import {missing}",
                                           hint=RUNTIME_HINT)
            made = await _run(conn, ["mktemp", "-d", f"{dev.remote_tmp.rstrip('/')}/edgecompress.XXXXXXXX"], short)
            remote = str(made.stdout or "").strip()
            if made.exit_status != 0 or not remote.startswith("/") or "\n" in remote:
                raise ProfileError(f"{dev.url.name}: cannot make a temp dir under {dev.remote_tmp}: "
                                   f"{str(made.stderr or '').strip() or remote}")
            run.remote_dir = remote
            try:
                await _run_in(conn, dev, run, files, spec, remote)
            finally:
                await _cleanup(conn, run, remote, short)
    except asyncssh.Error as e:  # the connection dropped mid-run
        raise ProfileError(f"lost the connection to {dev.url.name}: {e.reason or type(e).__name__}") from None
    return run


async def _run_in(conn: Any, dev: DeviceOptions, run: DeviceRun, files: list[Path], spec: dict[str, Any],
                  remote: str) -> None:
    import asyncssh

    spec = job_spec(spec, remote, f"{remote}/{files[0].name}")
    async with conn.start_sftp_client() as sftp:
        for f in files:
            beside = f.is_relative_to(files[0].parent)  # the model's external data keep their relative paths
            name = f.relative_to(files[0].parent).as_posix() if beside else f.name
            await sftp.put(str(f), f"{remote}/{name}")
        await sftp.put(str(RUNNER), f"{remote}/runner.py")
        async with sftp.open(f"{remote}/spec.json", "w") as fh:
            await fh.write(json.dumps(spec))
    pidfile = f"{remote}/runner.pid"
    # the shell records its pid and execs python in place, so a timeout can kill exactly that process
    argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', pidfile, dev.remote_python, f"{remote}/runner.py",
            f"{remote}/spec.json"]
    kill = ["sh", "-c", 'kill -9 "$(cat "$0")" 2>/dev/null; true', pidfile]
    try:
        proc = await _run(conn, argv, dev.run_timeout_s)
    except asyncio.CancelledError:  # Ctrl-C (asyncio.run cancels us): stop the remote runner too, then go on
        await asyncio.wait_for(_run(conn, kill, 10.0), 15.0)
        raise
    except asyncssh.TimeoutError:
        await _run(conn, kill, 10.0)
        raise ProfileError(f"the run on {dev.url.name} took longer than {dev.run_timeout_s:g} s (stopped)",
                           hint="raise --run-timeout, or lower --runs") from None
    result = parse_runner_output(str(proc.stdout or ""))
    if result is None:
        oom = out_of_memory(cap_mb=None, killed=proc.exit_status in (137, None) or bool(proc.exit_signal),
                            where=f" on {dev.url.name}")
        if oom is not None:
            raise oom
        tail = (str(proc.stderr or "").strip().splitlines() or ["no output"])[-1]
        raise ProfileError(f"the runner on {dev.url.name} failed: {tail}")
    if result.get("error_kind") == "missing-dependency":
        raise DeviceMissingRuntime(f"{dev.url.name}: {result.get('error')}", hint=RUNTIME_HINT)
    if not result.get("ok"):
        raise ProfileError(f"on {dev.url.name}: {result.get('error', 'the runner failed')}")
    run.result = result


async def _cleanup(conn: Any, run: DeviceRun, remote: str, timeout: float) -> None:
    try:
        done = await _run(conn, ["rm", "-rf", "--", remote], timeout)
        run.removed = done.exit_status == 0
    except Exception as e:  # never mask the real error; say what was left behind
        log.warning("could not remove %s on %s: %s", remote, run.device, e)
    if not run.removed:
        run.warnings.append(f"the remote temp dir {remote} on {run.device} may be left behind")

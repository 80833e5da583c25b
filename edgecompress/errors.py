"""Typed errors. The CLI maps each class to an exit code; library code only raises.

Exit codes (documented in the README):
    0  built, every budget met
    1  any other error (export, pass or profiler failure); nothing written
    2  usage error: bad model path, unknown target, malformed target or data file, bad option; nothing written
    3  built, but at least one budget failed (the bundle is written and says which)
    4  the system refused: out of disk space, permission denied, read-only file system, out of memory
    5  busy: another edgecompress process is writing the same --out
  130  interrupted (Ctrl-C or SIGTERM); nothing written
`edgecompress profile` adds, so a script can tell them apart:
   10  not a bundle (no manifest.json or model.onnx)        13  the device refused our key (authentication)
   11  malformed --device URL                               14  the device's host key is unknown or does not match
   12  the device cannot be reached (refused, timeout, DNS) 15  the device lacks python, numpy or onnxruntime
   16  the bundle failed verification: a file the manifest names is outside the bundle, missing, or does not
       match its sha256 (`emulator run` and `profile --update` too)
"""

from __future__ import annotations


class EdgeCompressError(Exception):
    """Base class: a one-line message for the user, plus an optional hint on how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        # keep the hint when an error crosses a process boundary (sweep workers)
        return (type(self), (self.message, self.hint))

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(EdgeCompressError):
    """The user asked for something that cannot work: fix the command line."""

    exit_code = 2


class ConfigError(UsageError):
    """A target file, option or config value is malformed or unknown."""


class ModelError(UsageError):
    """The model path is missing, is not a model, or has an unsupported architecture/task."""


class DataError(UsageError):
    """A calibration or evaluation file is empty, binary, unreadable or has the wrong shape."""


class OutputError(UsageError):
    """--out points somewhere we may not write (a file, or an existing dir without --force)."""


class ExportError(EdgeCompressError):
    """optimum's export failed or does not match PyTorch."""


class PassError(EdgeCompressError):
    """A compression pass could not run, or produced something unusable."""


class ProfileError(EdgeCompressError):
    """The profiler could not load or run the artifact."""


class BundleError(UsageError):
    """A bundle directory without manifest.json or model.onnx."""

    exit_code = 10


class BundleTampered(BundleError):
    """A file the manifest names is outside the bundle, or its content does not match the recorded sha256."""

    exit_code = 16


class BusyError(EdgeCompressError):
    """Another edgecompress process holds the lock on the same --out."""

    exit_code = 5


class ResourceError(EdgeCompressError):
    """The operating system refused (disk full, permission denied, out of memory): cli maps OSError here."""

    exit_code = 4


class DeviceURLError(UsageError):
    """--device is not ssh://user@host[:port]."""

    exit_code = 11


class DeviceError(ProfileError):
    """A lab device (profiling/ssh.py) could not be used."""


class DeviceUnreachable(DeviceError):
    exit_code = 12


class DeviceAuthError(DeviceError):
    exit_code = 13


class HostKeyError(DeviceError):
    """The device's host key is not in known_hosts, or does not match it."""

    exit_code = 14


class DeviceMissingRuntime(DeviceError):
    """The device has no python, numpy or onnxruntime for the runner."""

    exit_code = 15


class BuildInterrupted(EdgeCompressError):
    """Ctrl-C during a build: everything half-written was removed."""

    exit_code = 130


def describe_failure(e: BaseException) -> tuple[str, int]:
    """(one line for the user, exit code) for any exception: ours carry both; the operating system's, ONNX's and
    ONNX Runtime's are named; anything else is an internal error (the traceback is behind --debug)."""
    import errno

    if isinstance(e, EdgeCompressError):
        return _one(e.one_line()), e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return "interrupted: nothing was written", 130
    if isinstance(e, MemoryError):
        return ("out of memory (a model, input or workload too large for this machine's RAM; nothing was "
                "written)", ResourceError.exit_code)
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        why = {errno.ENOSPC: "out of disk space", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "read-only file system", errno.EMFILE: "too many open files",
               errno.ENAMETOOLONG: "file name too long"}.get(e.errno or 0, e.strerror or type(e).__name__)
        hint = {errno.ENOSPC: "free some space, or choose another --out / EDGECOMPRESS_CACHE_DIR",
                errno.EDQUOT: "free some space, or choose another --out / EDGECOMPRESS_CACHE_DIR",
                errno.EACCES: "check the permissions, or choose another path",
                errno.EROFS: "choose a writable --out / EDGECOMPRESS_CACHE_DIR"}.get(e.errno or 0)
        return _one(f"{why}{where}" + (f" ({hint})" if hint else "")), ResourceError.exit_code
    module = type(e).__module__ or ""
    first = _one(str(e)) or type(e).__name__
    if module.startswith("onnxruntime"):
        return f"ONNX Runtime cannot load or run the model: {first}", ProfileError.exit_code
    if module.startswith(("onnx", "google.protobuf")):
        return f"not a valid ONNX model: {first}", ProfileError.exit_code
    return (f"internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback, and please "
            "report it)", EdgeCompressError.exit_code)


def _one(text: str, limit: int = 600) -> str:
    """A message on one line, of bounded length (an ORT error can carry a whole graph dump)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + " …"

"""Typed errors. The CLI maps each class to an exit code; library code only raises.

Exit codes (documented in the README):
    0  built, every budget met
    1  any other error (export, pass or profiler failure); nothing written
    2  usage error: bad model path, unknown target, malformed target or data file, bad option; nothing written
    3  built, but at least one budget failed (the bundle is written and says which)
  130  interrupted (Ctrl-C); nothing written
`edgecompress profile` adds, so a script can tell them apart:
   10  not a bundle (no manifest.json or model.onnx)        13  the device refused our key (authentication)
   11  malformed --device URL                               14  the device's host key is unknown or does not match
   12  the device cannot be reached (refused, timeout, DNS) 15  the device lacks python, numpy or onnxruntime
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

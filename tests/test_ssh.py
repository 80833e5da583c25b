"""Lab devices over SSH, against a real OpenSSH server on 127.0.0.1 (a free high port, a generated host key and a
key-only test user), as in shared/arm-ssh-notes.md. Only 127.0.0.1 is ever addressed.

The fixture installs openssh-server if it is missing (CI's .ci/run does it first) and skips, with the reason, only
when sshd cannot be installed or started.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import matmul_model, sigint_default

from edgecompress.cli import main as cli
from edgecompress.errors import (
    DeviceAuthError,
    DeviceMissingRuntime,
    DeviceUnreachable,
    DeviceURLError,
    HostKeyError,
    ProfileError,
)
from edgecompress.profiling import ProfileOptions, profile_bundle
from edgecompress.profiling.local import input_specs, runner_spec
from edgecompress.profiling.ssh import DeviceOptions, DeviceURL, parse_device_url, profile_on_device

SSHD = "/usr/sbin/sshd"
# the venv's python: numpy + onnxruntime, as a lab device would have them
VENV_PYTHON = str(Path(sys.executable).absolute())


@dataclass(frozen=True)
class Lab:
    port: int
    user: str
    uid: int
    client_key: Path
    known_hosts: Path
    dir: Path

    def device(self, **kw: object) -> DeviceOptions:
        base = DeviceOptions(DeviceURL(self.user, "127.0.0.1", self.port), known_hosts=self.known_hosts,
                             identity=(self.client_key,), remote_python=VENV_PYTHON, connect_timeout_s=10,
                             run_timeout_s=120)
        return replace(base, **kw)  # type: ignore[arg-type]

    def leftovers(self) -> list[str]:
        """Remote temp dirs of the test user still on disk (the device is this machine)."""
        return [p for p in glob.glob("/tmp/edgecompress.*") if os.stat(p).st_uid == self.uid]

    def processes(self) -> str:
        return subprocess.run(["ps", "-u", str(self.uid), "-o", "args="], capture_output=True, text=True).stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_sshd() -> str | None:
    """None when sshd (and setfacl) are there, else why they could not be installed."""
    if os.geteuid() != 0:
        return "the lab needs root (a key-only test user, an sshd on a high port)"
    if os.path.exists(SSHD) and shutil.which("setfacl"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "openssh-server/acl are not installed and this is not root with apt-get"
    r = subprocess.run("apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=300 openssh-server acl",
                       shell=True, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not os.path.exists(SSHD):
        return f"apt-get install openssh-server failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def _keygen(path: Path) -> str:
    """A fresh ed25519 key pair; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return Path(str(path) + ".pub").read_text().strip()


def _as_user(user: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=60)


def _grant_python(user: str) -> list[str]:
    """Let the test user run the venv's python: its interpreter may live under a root-only dir (pyenv in /root).
    Returns the dirs given a per-user traverse-only ACL entry, for teardown."""
    granted: list[str] = []
    probe = [VENV_PYTHON, "-c", "import numpy, onnxruntime"]
    if _as_user(user, probe).returncode == 0:
        return granted
    real = Path(os.path.realpath(VENV_PYTHON))
    for d in [*reversed(real.parents), *reversed(Path(VENV_PYTHON).absolute().parents)]:
        if str(d) not in granted and d.stat().st_mode & 0o001 == 0:  # others may not traverse it
            subprocess.run(["setfacl", "-m", f"u:{user}:x", str(d)], check=True)
            granted.append(str(d))
    if _as_user(user, probe).returncode != 0:
        raise RuntimeError(f"the test user cannot run {VENV_PYTHON}: {_as_user(user, probe).stderr[-300:]}")
    return granted


def _revoke(user: str, granted: list[str]) -> None:
    for d in granted:
        subprocess.run(["setfacl", "-x", f"u:{user}", d], capture_output=True)
        acl = subprocess.run(["getfacl", "-c", "-p", d], capture_output=True, text=True).stdout
        if not any(line.startswith(("user:", "group:")) and not line.startswith(("user::", "group::"))
                   for line in acl.splitlines()):
            subprocess.run(["setfacl", "-b", d], capture_output=True)  # back to the plain mode bits


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = _ensure_sshd()
    if why:
        pytest.skip(f"no OpenSSH server for the lab-device tests: {why}")
    d = tmp_path_factory.mktemp("sshlab")
    user = "ecl" + uuid.uuid4().hex[:8]
    host_key, client_key = d / "host_ed25519", d / "client_ed25519"
    host_pub = _keygen(host_key)
    _keygen(client_key)
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", user], check=True)
    granted: list[str] = []
    pid_file = d / "sshd.pid"
    try:
        subprocess.run(["usermod", "-p", "*", user], check=True)  # unlocked, but no password can ever match
        home = Path(pwd.getpwnam(user).pw_dir)
        subprocess.run(["install", "-d", "-m", "700", "-o", user, str(home / ".ssh")], check=True)
        subprocess.run(["install", "-m", "600", "-o", user, str(client_key) + ".pub",
                        str(home / ".ssh" / "authorized_keys")], check=True)
        granted = _grant_python(user)
        port = _free_port()
        config = d / "sshd_config"
        config.write_text("\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {pid_file}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin no", f"AllowUsers {user}", "UsePAM no", "Subsystem sftp internal-sftp", ""]))
        os.makedirs("/run/sshd", exist_ok=True)
        r = subprocess.run([SSHD, "-f", str(config.absolute()), "-E", str(d / "sshd.log")], capture_output=True,
                           text=True)
        deadline = time.monotonic() + 10
        while r.returncode == 0 and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            log = (d / "sshd.log").read_text() if (d / "sshd.log").exists() else r.stderr
            pytest.skip(f"sshd did not start: {log.strip()[-300:]}")
        known = d / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        yield Lab(port, user, pwd.getpwnam(user).pw_uid, client_key, known, d)
    finally:
        if pid_file.exists():
            with open(pid_file) as f:
                pid = int(f.read().strip())
            os.kill(pid, 15)
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)  # this test user's processes only
        _revoke(user, granted)
        subprocess.run(["userdel", "-r", user], capture_output=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import edgecompress

    d = tmp_path_factory.mktemp("ssh-bundle")
    onnx.save(matmul_model(m=4, k=128, n=64, bias=True), str(d / "mm.onnx"))
    edgecompress.build(d / "mm.onnx", target="host", recipe="fp32", out=d / "b", runs=3)
    return d / "b"


# --- the real thing ------------------------------------------------------------------------------------------------
def test_profile_a_bundle_on_the_device(lab: Lab, bundle: Path) -> None:
    before = (bundle / "manifest.json").read_bytes()
    r = profile_bundle(bundle, "raspberry-pi-5", ProfileOptions(runs=5, min_seconds=0.0, device=lab.device()))
    dev = r.profile["device"]
    assert dev["source"] == "measured" and dev["device"] == f"{lab.user}@127.0.0.1:{lab.port}"
    assert dev["remote_dir_removed"] is True and lab.leftovers() == []
    assert dev["latency_ms"]["runs"] >= 5 and 0 < dev["latency_ms"]["p50"] <= dev["latency_ms"]["p90"]
    assert dev["session"]["intra_op_num_threads"] == 4  # the target's threads, not this host's
    assert dev["python"] and 0 < dev["baseline_rss_mb"] < dev["peak_rss_mb"]
    assert {o["op_type"] for o in dev["ops"]["by_op_type"]} == {"Gemm"}  # MatMul+Add fused by ORT
    assert dev["ops"]["nodes"][0]["provider"] == "CPUExecutionProvider"
    rows = {b.name: b for b in r.budgets}
    assert rows["latency_p90"].source == rows["peak_ram"].source == rows["load_time"].source == "measured"
    assert "host" not in r.profile and r.profile["estimate"]["source"] == "estimated"
    assert (bundle / "manifest.json").read_bytes() == before  # nothing written without --update


def test_cli_profile_on_the_device(lab: Lab, bundle: Path) -> None:
    res = CliRunner().invoke(cli, ["profile", str(bundle), "--target", "host", "--device",
                                   f"ssh://{lab.user}@127.0.0.1:{lab.port}", "--known-hosts", str(lab.known_hosts),
                                   "-i", str(lab.client_key), "--remote-python", VENV_PYTHON, "--runs", "3",
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert '"device": "' + f"{lab.user}@127.0.0.1:{lab.port}" in res.output
    assert lab.leftovers() == []


def test_host_key_mismatch_is_refused(lab: Lab, bundle: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{lab.port} {_keygen(tmp_path / 'other_ed25519')}\n")
    with pytest.raises(HostKeyError, match="does NOT match"):
        profile_bundle(bundle, "host", ProfileOptions(runs=2, device=lab.device(known_hosts=wrong)))
    unknown = tmp_path / "known_hosts_empty"
    unknown.write_text("")
    with pytest.raises(HostKeyError, match="is not in"):
        profile_bundle(bundle, "host", ProfileOptions(runs=2, device=lab.device(known_hosts=unknown)))
    assert lab.leftovers() == []  # refused before anything was uploaded
    res = CliRunner().invoke(cli, ["profile", str(bundle), "--target", "host", "--device",
                                   f"ssh://{lab.user}@127.0.0.1:{lab.port}", "--known-hosts", str(wrong),
                                   "-i", str(lab.client_key), "--remote-python", VENV_PYTHON])
    assert res.exit_code == 14, res.output
    # the explicit escape hatch works, and says loudly what it did
    r = profile_bundle(bundle, "host", ProfileOptions(runs=2, min_seconds=0.0, op_profile_runs=0,
                                                      device=lab.device(known_hosts=wrong,
                                                                        insecure_accept_host_key=True)))
    assert any("INSECURE" in w for w in r.profile["device"]["limits"]["warnings"])


def test_wrong_client_key_is_an_auth_failure(lab: Lab, bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "stranger_ed25519"
    _keygen(other)
    with pytest.raises(DeviceAuthError, match="refused our key"):
        profile_bundle(bundle, "host", ProfileOptions(runs=2, device=lab.device(identity=(other,))))
    res = CliRunner().invoke(cli, ["profile", str(bundle), "--target", "host", "--device",
                                   f"ssh://{lab.user}@127.0.0.1:{lab.port}", "--known-hosts", str(lab.known_hosts),
                                   "-i", str(other)])
    assert res.exit_code == 13, res.output


def test_device_without_onnxruntime(lab: Lab, bundle: Path) -> None:
    with pytest.raises(DeviceMissingRuntime, match=r"onnxruntime|numpy") as e:
        profile_bundle(bundle, "host", ProfileOptions(runs=2, device=lab.device(remote_python="/usr/bin/python3")))
    assert "pip install onnxruntime numpy" in e.value.one_line()
    with pytest.raises(DeviceMissingRuntime, match="has no"):
        profile_bundle(bundle, "host", ProfileOptions(runs=2, device=lab.device(remote_python="/nonexistent/py")))
    res = CliRunner().invoke(cli, ["profile", str(bundle), "--target", "host", "--device",
                                   f"ssh://{lab.user}@127.0.0.1:{lab.port}", "--known-hosts", str(lab.known_hosts),
                                   "-i", str(lab.client_key), "--remote-python", "/usr/bin/python3"])
    assert res.exit_code == 15, res.output
    assert lab.leftovers() == []


def test_run_timeout_kills_the_runner_and_cleans_up(lab: Lab, bundle: Path) -> None:
    model = bundle / "model.onnx"
    spec = runner_spec(model.name, input_specs(model, {}, None), threads=1, runs=10**9, warmup=1,
                       min_seconds=120.0, max_seconds=120.0)
    t0 = time.monotonic()
    with pytest.raises(ProfileError, match="took longer than 2 s"):
        profile_on_device(model, spec, lab.device(run_timeout_s=2.0))
    assert time.monotonic() - t0 < 30
    assert lab.leftovers() == []  # removed after the failure too
    time.sleep(0.5)
    assert "runner.py" not in lab.processes()  # and the runner itself was stopped


_INTERRUPTIBLE = """
import sys
from pathlib import Path
from edgecompress.profiling.local import input_specs, runner_spec
from edgecompress.profiling.ssh import DeviceOptions, DeviceURL, profile_on_device
user, port, known, key, py, model = sys.argv[1:]
spec = runner_spec(Path(model).name, input_specs(Path(model), {}, None), threads=1, runs=10**9, warmup=1,
                   min_seconds=120.0, max_seconds=120.0)
dev = DeviceOptions(DeviceURL(user, "127.0.0.1", int(port)), known_hosts=Path(known), identity=(Path(key),),
                    remote_python=py, connect_timeout_s=10, run_timeout_s=120)
profile_on_device(Path(model), spec, dev)
"""


def test_ctrl_c_stops_the_remote_runner_and_cleans_up(lab: Lab, bundle: Path) -> None:
    """SIGINT while the runner is busy on the device: the remote process is killed, not left to run out its time."""
    model = bundle / "model.onnx"
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTIBLE, lab.user, str(lab.port), str(lab.known_hosts),
                             str(lab.client_key), VENV_PYTHON, str(model)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 60
        while "runner.py" not in lab.processes():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the remote runner never started"
            time.sleep(0.2)
        proc.send_signal(2)
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    time.sleep(0.5)
    assert "runner.py" not in lab.processes()
    assert lab.leftovers() == []


def test_a_failing_run_still_cleans_up(lab: Lab, bundle: Path) -> None:
    model = bundle / "model.onnx"
    wrong = [{"name": "X", "dtype": "float32", "shape": [3, 3], "fill": "normal"}]  # the model wants [4, 128]
    spec = runner_spec(model.name, wrong, threads=1, runs=1, min_seconds=0.0)
    with pytest.raises(ProfileError, match="failed while running the model"):
        profile_on_device(model, spec, lab.device())
    assert lab.leftovers() == []


def test_a_runner_killed_on_the_device_is_a_failed_memory_budget(lab: Lab, bundle: Path) -> None:
    """SIGKILL on the device (what its out-of-memory killer does; we set no cap there): the same handler as a kill
    at our cap on this host, a failed peak_ram with the reason, not a crash; the remote dir is still removed."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="edgecompress-killpy-"))
    try:
        d.chmod(0o755)
        killer = d / "python"  # the device's python: answers the probe, then dies by SIGKILL running the runner
        killer.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {VENV_PYTHON} "$@"; fi\nkill -9 $$\n')
        killer.chmod(0o755)
        r = profile_bundle(bundle, "raspberry-pi-5", ProfileOptions(runs=2, min_seconds=0.0, op_profile_runs=0,
                                                                    device=lab.device(remote_python=str(killer))))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    dev = r.profile["device"]
    assert dev["out_of_memory"] is True and dev["memory_cap_mb"] is None and "killed (out of memory?)" in dev["note"]
    rows = {b.name: b for b in r.budgets}
    assert not rows["peak_ram"].passed and rows["peak_ram"].source == "measured"
    assert lab.leftovers() == []


# --- no server needed ------------------------------------------------------------------------------------------
def test_connect_timeout_on_a_silent_port() -> None:
    """A port that accepts TCP but never says SSH: the connect timeout, not a hang."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        dev = DeviceOptions(DeviceURL("nobody", "127.0.0.1", port), insecure_accept_host_key=True,
                            connect_timeout_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(DeviceUnreachable, match="no SSH answer within 1 s"):
            _connect_only(dev)
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


def _connect_only(dev: DeviceOptions) -> None:
    import asyncio

    from edgecompress.profiling import ssh

    async def go() -> None:
        conn = await ssh._connect(dev, [])
        conn.close()

    asyncio.run(go())


def test_refused_port_is_unreachable(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    dev = DeviceOptions(DeviceURL("nobody", "127.0.0.1", port), insecure_accept_host_key=True)
    with pytest.raises(DeviceUnreachable, match=r"cannot reach 127\.0\.0\.1"):
        _connect_only(dev)


def test_missing_known_hosts_file_is_a_host_key_error(tmp_path: Path) -> None:
    dev = DeviceOptions(DeviceURL("nobody", "127.0.0.1", 2222), known_hosts=tmp_path / "none")
    with pytest.raises(HostKeyError, match="no known_hosts file") as e:
        _connect_only(dev)
    assert "ssh-keyscan -p 2222 127.0.0.1" in e.value.one_line()


@pytest.mark.parametrize("url", ["http://pi@host", "ssh://host-without-user", "ssh://pi@", "ssh://pi@host:port",
                                 "ssh://pi@host:99999", "ssh://pi:secret@host", "ssh://pi@host/path",
                                 "ssh://pi@host?x=1", "ssh://pi@ho st", "ssh://pi@host;rm -rf /", "pi@host"])
def test_malformed_device_urls(url: str) -> None:
    with pytest.raises(DeviceURLError):
        parse_device_url(url)


def test_device_urls() -> None:
    assert parse_device_url("ssh://pi@raspberrypi.local") == DeviceURL("pi", "raspberrypi.local", 22)
    assert parse_device_url("ssh://lab_user@127.0.0.1:2222") == DeviceURL("lab_user", "127.0.0.1", 2222)
    assert parse_device_url("ssh://pi@[::1]:22").host == "::1"

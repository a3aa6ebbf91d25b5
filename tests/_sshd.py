"""A second "host" for horovodrun on this machine: an sshd of the test's own on 127.0.0.2.

horovodrun starts a rank directly when its host resolves to an address of one of this
machine's interfaces (``network.get_local_host_addresses``: 127.0.0.1 on ``lo``), and over
``ssh HOST`` otherwise (horovod/runner/gloo_run.py). 127.0.0.2 reaches ``lo`` too, but is
no interface's address, so ranks placed there are started through ssh exactly as on a real
second host. Horovod's own CI does the same with password-less ssh to the loopback address.

``loopback_sshd(tmp)`` starts ``/usr/sbin/sshd -D`` as a child with everything in ``tmp``:
its config, a fresh host key, a fresh client key and the authorized_keys file, listening on
127.0.0.2 at a free port; it stops it (and any session it left) on exit. Nothing outside
``tmp`` is changed, with two unavoidable exceptions that are undone:

* ``/run/sshd``, the privilege-separation directory sshd insists on, is created when
  missing and removed afterwards (only if this helper created it, and no other sshd runs);
* the ssh client creates ``~/.ssh`` when it does not exist (OpenSSH's ssh.c does so on
  every start); it is removed afterwards if this helper's run created it and it is empty.

Known hosts never touch ``~/.ssh``: horovodrun calls plain ``ssh`` (with
StrictHostKeyChecking=no, which would record the host key in ``~/.ssh/known_hosts``), so the
returned environment puts a ``ssh`` wrapper first on PATH that adds ``-F <tmp>/ssh_config``
(UserKnownHostsFile /dev/null, no system or user ssh config read).

Needs root (sshd must own its host key and switch users) and OpenSSH's server
(``launch/setup.sh --test`` installs Debian's openssh-server); ``skip_reason()`` says what
is missing so the tests can ``pytest.skip`` with it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

SSHD = "/usr/sbin/sshd"
HOST_B = "127.0.0.2"
PRIVSEP_DIR = "/run/sshd"
START_TIMEOUT = 20.0  # seconds for sshd to accept connections


def skip_reason() -> str | None:
    """Why this machine cannot run an sshd for the test, or None when it can."""
    if os.geteuid() != 0:
        return "a test sshd needs root (run the two-host tests as root, as CI does)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing: install openssh-server (launch/setup.sh --test does it)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH: install openssh-client"
    try:
        with socket.socket() as sock:
            sock.bind((HOST_B, 0))
    except OSError as exc:
        return f"cannot bind {HOST_B} on this machine ({exc})"
    return None


def free_port(host: str = HOST_B) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class SshHost:
    """A running test sshd: where it listens, the client key, and PATH with the ssh wrapper."""
    host: str
    port: int
    key: str
    path: str          # PATH for horovodrun: the ssh wrapper directory first
    log: str           # sshd's own log (-E)

    def horovodrun_args(self) -> list:
        """horovodrun's ssh options for this host (as a user would pass them)."""
        return ["-p", str(self.port), "-i", self.key]


def _die_with_parent() -> None:
    """In the sshd child before exec: SIGTERM when the test process dies (Linux
    prctl PR_SET_PDEATHSIG), so a killed pytest does not leave our sshd listening."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _other_sshd_running() -> bool:
    """Whether some other sshd (the system's, another test's) is running: then /run/sshd,
    which it may need, stays even if this helper created it."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    head, tail = fh.read().rsplit(")", 1)
            except OSError:
                continue
            if head.split("(", 1)[1] == "sshd" and tail.split()[0] != "Z":
                return True
    return False


def _write(path: str, text: str, mode: int = 0o600) -> None:
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)


def _wait_listening(proc: subprocess.Popen, log: str) -> None:
    """Wait for sshd's "Server listening" line (no probe connection, so its log stays clean)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = open(log).read() if os.path.exists(log) else ""
        if "Server listening" in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with status {proc.returncode}: {text[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not start listening within {START_TIMEOUT:.0f} s")


@contextlib.contextmanager
def loopback_sshd(tmp: str, base_path: str | None = None):
    """Run a private sshd on 127.0.0.2 for the duration of the ``with`` block.

    Args:
        tmp: an empty directory, owned by root and not writable by others (pytest's
            tmp_path is), for config, keys and logs.
        base_path: PATH to put the ssh wrapper in front of (default: this process's PATH).

    Yields:
        SshHost. On exit sshd and every process it started are terminated, and
        /run/sshd and ~/.ssh are removed if this call created them.
    """
    tmp = os.path.abspath(tmp)
    home_ssh = os.path.join(os.path.expanduser("~root" if os.geteuid() == 0 else "~"), ".ssh")
    made_home_ssh = not os.path.exists(home_ssh)
    made_privsep = not os.path.exists(PRIVSEP_DIR)
    if made_privsep:
        os.makedirs(PRIVSEP_DIR, mode=0o755)
    proc = None
    try:
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"dist_triplet-{name}",
                            "-f", os.path.join(tmp, name)], check=True, capture_output=True)
        shutil.copy(os.path.join(tmp, "client_key.pub"), os.path.join(tmp, "authorized_keys"))
        os.chmod(os.path.join(tmp, "authorized_keys"), 0o600)
        port = free_port()
        config = os.path.join(tmp, "sshd_config")
        log = os.path.join(tmp, "sshd.log")
        # StrictModes no: the files sit under /tmp (mode 1777), which StrictModes refuses
        # as a parent of authorized_keys. Only our key is accepted, only on 127.0.0.2.
        _write(config, "\n".join([
            f"ListenAddress {HOST_B}:{port}",
            f"HostKey {tmp}/host_key",
            f"AuthorizedKeysFile {tmp}/authorized_keys",
            f"PidFile {tmp}/sshd.pid",
            "AuthenticationMethods publickey",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "PermitUserEnvironment no",
            "PermitUserRC no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "MaxStartups 20",
            "LogLevel INFO",
            "",
        ]))
        ssh_config = os.path.join(tmp, "ssh_config")
        _write(ssh_config, "\n".join([
            "Host *",
            "  UserKnownHostsFile /dev/null",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking no",
            "  BatchMode yes",
            "  IdentitiesOnly yes",
            "  LogLevel ERROR",
            "",
        ]))
        bindir = os.path.join(tmp, "bin")
        os.mkdir(bindir)
        _write(os.path.join(bindir, "ssh"),
               f'#!/bin/sh\nexec {shutil.which("ssh")} -F {ssh_config} "$@"\n', 0o755)
        proc = subprocess.Popen([SSHD, "-D", "-f", config, "-E", log],
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
        _wait_listening(proc, log)
        path = os.pathsep.join([bindir, base_path if base_path is not None
                                else os.environ.get("PATH", "")])
        yield SshHost(HOST_B, port, os.path.join(tmp, "client_key"), path, log)
    finally:
        if proc is not None:
            _stop(proc)
        if made_privsep and not _other_sshd_running():
            shutil.rmtree(PRIVSEP_DIR, ignore_errors=True)
        if made_home_ssh and os.path.isdir(home_ssh):
            with contextlib.suppress(OSError):
                os.rmdir(home_ssh)  # only when empty: never remove what someone put there


def descendants(pid: int) -> list:
    """Pids of every living process below ``pid`` (children first-level, then theirs)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    # pid (comm) state ppid ...: comm may hold spaces or ')'
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """Stop sshd and everything it started: its per-connection children call setsid(), so
    they are found by parent pid, not by process group."""
    below = descendants(proc.pid)
    for pid in [proc.pid] + below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if pid != proc.pid else signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)

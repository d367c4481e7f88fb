"""Process plumbing for the interop suite: ports, processes, sipring's config and metrics,
and baresip driven over its ctrl_tcp interface (netstring JSON commands and events)."""

import json
import os
import queue
import random
import socket
import subprocess
import threading
import time
import urllib.request
import wave

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
SIPRING = os.path.join(TARGET, "debug", "sipring")


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A free port below the kernel's ephemeral range: a port the kernel handed out for
    port 0 can be handed out again, to some client's outgoing connection, before the
    process it was meant for binds it (baresip then fails with 'Address already in use')."""
    high = max(_ephemeral_low() - 1, 11000)
    for _ in range(200):
        port = random.randint(10000, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def wait_port(port, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class Proc:
    """A child process logging to a file, stopped (then killed) at the end."""

    def __init__(self, name, cmd, workdir, env=None):
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log_file = open(self.log_path, "w")
        self.p = subprocess.Popen(
            cmd, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=workdir,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log_file.close()


def metrics(admin_port):
    """Merged sipring metrics: name{labels} -> value (per-shard series skipped)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read()
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or 'shard="' in line or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


def metric(admin_port, name):
    return metrics(admin_port).get(name, 0.0)


def wait_for(what, f, timeout=15, step=0.1):
    end = time.time() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


class Baresip:
    """A baresip user agent with its own config folder, driven over ctrl_tcp."""

    def __init__(self, workdir, name, account, cafile, trace=True):
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.ctrl = free_port()
        # 8 kHz silence for the audio source (ausine only does 48 kHz, PCMU is 8 kHz).
        wav = os.path.join(self.dir, "silence.wav")
        with wave.open(wav, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\0\0" * 8000 * 30)
        with open(os.path.join(self.dir, "config"), "w") as f:
            f.write(f"""poll_method epoll
sip_listen 127.0.0.1:{free_port()}
sip_transports tls
sip_cafile {cafile}
audio_source aufile,{wav}
audio_player aufile,/dev/null
audio_alert aufile,/dev/null
rtp_ports {10000 + (self.ctrl % 20000)}-{10100 + (self.ctrl % 20000)}
module_path /usr/lib/baresip/modules
module g711.so
module aufile.so
module_app account.so
module_app menu.so
module_app ctrl_tcp.so
ctrl_tcp_listen 127.0.0.1:{self.ctrl}
""")
        with open(os.path.join(self.dir, "accounts"), "w") as f:
            f.write(account + "\n")
        args = ["baresip", "-f", self.dir] + (["-s"] if trace else [])
        self.proc = Proc(name, args, workdir)
        wait_port(self.ctrl)
        self.sock = socket.create_connection(("127.0.0.1", self.ctrl))
        self.events = queue.Queue()
        self.responses = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b":" in buf:
                n, rest = buf.split(b":", 1)
                n = int(n)
                if len(rest) < n + 1:
                    break
                msg = json.loads(rest[:n])
                buf = rest[n + 1:]
                (self.events if msg.get("event") else self.responses).put(msg)

    def command(self, command, params=""):
        body = json.dumps({"command": command, "params": params, "token": command}).encode()
        self.sock.sendall(str(len(body)).encode() + b":" + body + b",")
        r = self.responses.get(timeout=10)
        assert r.get("ok"), f"{self.proc.name}: {command} {params}: {r}"
        return r

    def wait_event(self, kind, timeout=15):
        """The next event of this type (earlier ones of other types are kept in `seen`)."""
        end = time.time() + timeout
        while True:
            left = end - time.time()
            if left <= 0:
                raise AssertionError(
                    f"{self.proc.name}: no {kind}; events so far: "
                    + ", ".join(e.get("type", "?") for e in self.seen)
                    + "\n" + self.proc.log()[-3000:])
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(e)
            if e.get("type") == kind:
                return e

    def stop(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.proc.stop()

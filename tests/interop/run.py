#!/usr/bin/env python3
"""The interop suite: sipring against SIP software nobody here wrote, on loopback.

    tests/interop/run.sh            (installs kamailio, baresip, sip-tester; then runs this)

Scenarios, each with its own processes, ports and folder, each bounded in time:

  baresip-outbound   two baresip UAs register over TLS with sipring as outbound proxy
                     (a preloaded Route to sipring), digest-authenticate, call, hang up
  baresip-direct     the same without an outbound proxy (the SIP domain is sipring's address)
  kamailio           sipring and Kamailio federated over mutual TLS; baresip UAs on each
                     side call each other both ways; ACK and BYE cross both proxies
  sipp-tcp           SIPp UAS (registered with digest) and UAC call through the tcp listener

Every call checks: both UAs report the call established and closed, ACK and BYE were
delivered (the callee's 200 is not retransmitted, sipring counted the ACK and BYE), and
sipring answered nothing unexpected.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from harness import (SIPRING, Baresip, Proc, free_port, metric, metrics, wait_for,  # noqa: E402
                     wait_port)

HERE = os.path.dirname(os.path.abspath(__file__))


class Sipring:
    """sipring with a throwaway PKI: tls, mtls and tcp listeners on 127.0.0.1."""

    def __init__(self, work, domains, users, peers="", algorithms='["SHA-256", "MD5"]'):
        self.work = work
        self.pki = os.path.join(work, "pki")
        subprocess.run([SIPRING, "certs", "--out", self.pki], check=True, stdout=subprocess.DEVNULL)
        self.tls, self.mtls, self.tcp, self.admin = free_port(), free_port(), free_port(), free_port()
        subs = os.path.join(work, "subscribers.toml")
        with open(subs, "w") as f:
            for realm, user, password in users:
                r = subprocess.run([SIPRING, "subscriber", "--username", user, "--realm", realm],
                                   input=password + "\n", text=True, check=True, capture_output=True)
                f.write(r.stdout + "\n")
        doms = ", ".join(f'"{d}"' for d in domains)
        # Partners connect to the mtls listener (sipring refuses one with no partner).
        mtls = f'[[listen]]\nkind = "mtls"\naddress = "127.0.0.1:{self.mtls}"\n\n' if peers else ""
        self.config = os.path.join(work, "sipring.toml")
        with open(self.config, "w") as f:
            f.write(f"""[server]
shards = 1
domains = [{doms}]
hostname = "127.0.0.1"
local_hosts = ["localhost"]

[[listen]]
kind = "tls"
address = "127.0.0.1:{self.tls}"

{mtls}[[listen]]
kind = "tcp"
address = "127.0.0.1:{self.tcp}"

[[tls.certificate]]
cert = "{self.pki}/server.pem"
key = "{self.pki}/server.key"
sni = ["sip.example.com"]

[auth]
subscribers = "{subs}"
algorithms = {algorithms}

[admin]
address = "127.0.0.1:{self.admin}"
{peers}""")
        self.proc = Proc("sipring", [SIPRING, "run", "--config", self.config], work,
                         env={"SIPRING_LOG": "info"})
        wait_port(self.tls)
        wait_port(self.admin)

    def m(self, name):
        return metric(self.admin, name)

    def stop(self):
        self.proc.stop()


def promtool_clean(srv):
    """Both metrics endpoints pass `promtool check metrics` (each family once, with HELP and
    TYPE): what a Prometheus user would lint."""
    for path in ("/metrics", "/metrics/shards"):
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.admin}{path}", timeout=5).read()
        r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert r.returncode == 0, f"promtool on {path}: {r.stdout.decode()} {r.stderr.decode()}"


def quiet_after_ack(srv, settle=1.6):
    """No response arrives at sipring for a while after a call is up: the callee got its ACK
    (else it retransmits its 200 at 0.5 s, 1.5 s, ...). Metrics are published every 0.5 s:
    the first reading waits for the call's own responses to be in."""
    time.sleep(0.7)
    before = srv.m('sipring_messages_in_total{kind="response"}')
    time.sleep(settle)
    after = srv.m('sipring_messages_in_total{kind="response"}')
    assert after == before, f"{after - before} responses after the ACK: the 200 was retransmitted"


def counts(srv):
    """sipring's ACK and BYE counters now (after the last publication)."""
    time.sleep(0.6)
    return (srv.m('sipring_messages_in_total{kind="ACK"}'),
            srv.m('sipring_messages_in_total{kind="BYE"}'))


def crossed(srv, acks, byes):
    """The call's ACK and exactly one BYE crossed sipring; nothing was dropped."""
    wait_for("the BYE counted", lambda: srv.m('sipring_messages_in_total{kind="BYE"}') >= byes + 1,
             timeout=3)
    assert srv.m('sipring_messages_in_total{kind="BYE"}') == byes + 1, "BYE seen more than once"
    assert srv.m('sipring_messages_in_total{kind="ACK"}') > acks, "no ACK crossed sipring"
    assert srv.m("sipring_responses_dropped_total") == 0, "sipring dropped responses"


def call(caller, callee, uri, who):
    """caller dials uri; callee auto-answers; both see it up; caller hangs up; both see it
    closed. Returns nothing; raises with the UAs' logs when a step does not happen."""
    caller.command("dial", uri)
    callee.wait_event("CALL_ESTABLISHED")
    caller.wait_event("CALL_ESTABLISHED")
    print(f"  {who}: call established")
    return


def hang_up(caller, callee, who):
    caller.command("hangup")
    callee.wait_event("CALL_CLOSED")
    caller.wait_event("CALL_CLOSED")
    print(f"  {who}: call closed by BYE")


def account(user, domain, password, outbound=None, extra=""):
    a = f"<sip:{user}@{domain};transport=tls>;auth_pass={password};answermode=auto;regint=300"
    if outbound:
        a += f';outbound="{outbound}"'
    return a + extra


def scenario_baresip(work, outbound, algorithms="[\"MD5\"]"):
    name = "baresip-outbound" if outbound else "baresip-direct"
    if outbound:
        domain = "example.com"
        srv = Sipring(work, ["example.com"], [(domain, "alice", "pa"), (domain, "bob", "pb")],
                      algorithms=algorithms)
        proxy = f"sip:127.0.0.1:{srv.tls};transport=tls"
    else:
        # No outbound proxy: the UA sends to its SIP domain, here sipring's own address.
        srv = Sipring(work, ["127.0.0.1"], [("127.0.0.1", "alice", "pa"), ("127.0.0.1", "bob", "pb")],
                      algorithms=algorithms)
        domain = f"127.0.0.1:{srv.tls}"
        proxy = None
    ca = os.path.join(srv.pki, "ca.pem")
    uas = []
    try:
        a = Baresip(work, "alice", account("alice", domain, "pa", proxy), ca)
        uas.append(a)
        b = Baresip(work, "bob", account("bob", domain, "pb", proxy), ca)
        uas.append(b)
        # (baresip registers before its control socket is ours: the bindings tell.)
        wait_for("2 bindings", lambda: srv.m("sipring_bindings") == 2)
        print(f"  {name}: both registered (digest)")
        acks, byes = counts(srv)
        call(a, b, f"sip:bob@{domain}", name)
        quiet_after_ack(srv)
        hang_up(a, b, name)
        crossed(srv, acks, byes)
        promtool_clean(srv)
    except BaseException:
        print(srv.proc.log()[-4000:])
        raise
    finally:
        for u in uas:
            u.stop()
        srv.stop()


class Kamailio:
    """Kamailio 5.6 (Debian's) as partner `kam` for domain kam.test: its UA port (TLS) and
    its peering port (mutual TLS with sipring's CA), configured from kamailio/*.cfg."""

    def __init__(self, work, kpki, peer_port, sipring_pki, sipring_mtls):
        self.ua, self.peer = free_port(), peer_port
        marks = {"@KUA@": str(self.ua), "@KPEER@": str(self.peer), "@SPEER@": str(sipring_mtls),
                 "@DIR@": work, "@KPKI@": kpki, "@SPKI@": sipring_pki}
        for name in ("kamailio.cfg", "tls.cfg"):
            text = open(os.path.join(HERE, "kamailio", name)).read()
            for k, v in marks.items():
                text = text.replace(k, v)
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
        run = os.path.join(work, "run")
        os.makedirs(run, exist_ok=True)
        self.proc = Proc("kamailio", ["kamailio", "-f", os.path.join(work, "kamailio.cfg"),
                                      "-P", os.path.join(run, "kamailio.pid"), "-w", run, "-DD",
                                      "-E", "-m", "64", "-M", "16"], work)
        wait_port(self.ua)
        wait_port(self.peer)

    def stop(self):
        self.proc.stop()


def scenario_kamailio(work):
    """sipring (example.com) and Kamailio (kam.test) federated over mutual TLS, each with a
    baresip UA; calls both ways, ACK and BYE crossing both proxies."""
    # Kamailio's own CA and certificate (sip.kam.test), made first: sipring trusts its CA
    # for partner `kam` only.
    kpki = os.path.join(work, "kpki")
    subprocess.run([SIPRING, "certs", "--domain", "kam.test", "--out", kpki], check=True,
                   stdout=subprocess.DEVNULL)
    kpeer = free_port()
    peers = f"""
[[peer]]
name = "kam"
domains = ["kam.test"]
address = "127.0.0.1:{kpeer}"
server_name = "sip.kam.test"
roots = "{kpki}/ca.pem"
crls = ["{kpki}/ca.crl"]
"""
    srv = Sipring(work, ["example.com"], [("example.com", "alice", "pa")], peers=peers,
                  algorithms='["MD5"]')
    kam = None
    uas = []
    try:
        kam = Kamailio(work, kpki, kpeer, srv.pki, srv.mtls)
        alice = Baresip(work, "alice", account("alice", "example.com", "pa",
                                               f"sip:127.0.0.1:{srv.tls};transport=tls"),
                        os.path.join(srv.pki, "ca.pem"))
        uas.append(alice)
        bob = Baresip(work, "bob", account("bob", "kam.test", "unused",
                                           f"sip:127.0.0.1:{kam.ua};transport=tls"),
                      os.path.join(kpki, "ca.pem"))
        uas.append(bob)
        wait_for("alice bound at sipring", lambda: srv.m("sipring_bindings") == 1)
        time.sleep(1)  # bob's REGISTER at Kamailio (no metrics there; the call will tell)
        # sipring → Kamailio: alice calls bob; alice hangs up.
        acks, byes = counts(srv)
        call(alice, bob, "sip:bob@kam.test", "sipring → kamailio")
        quiet_after_ack(srv)
        hang_up(alice, bob, "sipring → kamailio")
        crossed(srv, acks, byes)
        # Kamailio → sipring: bob calls alice; bob hangs up (the BYE reaches sipring on
        # a connection Kamailio opens to the mtls listener, with its certificate).
        acks, byes = counts(srv)
        call(bob, alice, "sip:alice@example.com", "kamailio → sipring")
        quiet_after_ack(srv)
        hang_up(bob, alice, "kamailio → sipring")
        crossed(srv, acks, byes)
        m = metrics(srv.admin)
        assert m.get('sipring_tls_rejections_total{reason="name_not_trusted"}', 0) == 0
        refused = {k: v for k, v in m.items() if k.startswith("sipring_sip_refusals_total")}
        assert not refused, f"sipring refused requests: {refused}"
        promtool_clean(srv)
    except BaseException:
        print(srv.proc.log()[-4000:])
        if kam is not None:
            print(kam.proc.log()[-4000:])
        raise
    finally:
        for u in uas:
            u.stop()
        if kam is not None:
            kam.stop()
        srv.stop()


def sipp(work, name, args, timeout):
    """Runs SIPp (Debian's, no TLS: the tcp listener) to completion; returns (exit code,
    its message trace)."""
    trace = os.path.join(work, f"{name}_messages.log")
    cmd = ["sipp", "-t", "t1", "-i", "127.0.0.1", "-nostdin", "-trace_msg", "-message_file",
           trace, "-trace_err", "-error_file", os.path.join(work, f"{name}_errors.log"),
           "-timeout", f"{timeout}s", "-timeout_error"] + args
    p = Proc(name, cmd, work)
    return p


def scenario_sipp(work):
    """SIPp over the tcp listener: a UAS that registers (digest), a UAC that calls it."""
    srv = Sipring(work, ["example.com"], [("example.com", "sippuas", "psu"),
                                          ("example.com", "sippuac", "psc")],
                  algorithms='["MD5"]')
    target = f"127.0.0.1:{srv.tcp}"
    sc = os.path.join(HERE, "sipp")
    callee = caller = None
    try:
        callee = sipp(work, "sipp-uas", ["-sf", os.path.join(sc, "register.xml"), "-oocsf",
                                         os.path.join(sc, "answer.xml"), "-m", "1", "-p",
                                         str(free_port()), target], 30)
        wait_for("sippuas bound", lambda: srv.m("sipring_bindings") == 1)
        print("  sipp-tcp: UAS registered (digest)")
        acks, byes = counts(srv)
        caller = sipp(work, "sipp-uac", ["-sf", os.path.join(sc, "call.xml"), "-m", "1", "-p",
                                         str(free_port()), target], 20)
        rc = caller.p.wait(30)
        trace = open(caller.log_path.replace(".log", "_messages.log"), errors="replace").read() \
            if os.path.exists(os.path.join(work, "sipp-uac_messages.log")) else ""
        assert rc == 0, f"SIPp UAC exit {rc}\n{caller.log()[-3000:]}\n{trace[-3000:]}"
        print("  sipp-tcp: call completed (INVITE/407/ACK/INVITE/200/ACK/BYE/200)")
        crossed(srv, acks, byes)
        uas = open(os.path.join(work, "sipp-uas_messages.log"), errors="replace").read()
        for what in ("ACK sip:", "BYE sip:"):
            assert what in uas, f"the UAS never received {what.split()[0]}\n{uas[-3000:]}"
        # The callee sent one 200 for the INVITE and one for the BYE: nothing retransmitted
        # (SIPp retransmits a 200 that no ACK answers, TCP or not).
        sent = [b for b in uas.split("TCP message sent")[1:] if "\nSIP/2.0 200 OK" in b[:200]]
        assert len(sent) == 2, f"the UAS sent {len(sent)} 200s (INVITE, BYE expected)"
    except BaseException:
        print(srv.proc.log()[-4000:])
        raise
    finally:
        for p in (caller, callee):
            if p is not None:
                p.stop()
        srv.stop()


SCENARIOS = {
    "baresip-outbound": lambda w: scenario_baresip(w, True),
    "baresip-direct": lambda w: scenario_baresip(w, False),
    "kamailio": scenario_kamailio,
    "sipp-tcp": scenario_sipp,
}


def main():
    wanted = sys.argv[1:] or list(SCENARIOS)
    base = tempfile.mkdtemp(prefix="sipring-interop-")
    failed = []
    for name in wanted:
        work = os.path.join(base, name)
        os.makedirs(work)
        t0 = time.time()
        print(f"== {name}")
        try:
            SCENARIOS[name](work)
            print(f"== {name}: ok ({time.time() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001 - report every scenario
            failed.append(name)
            print(f"== {name}: FAILED ({time.time() - t0:.1f} s): {e}")
    if failed:
        print(f"interop: {len(failed)} failed: {' '.join(failed)} (logs in {base})")
        sys.exit(1)
    shutil.rmtree(base, ignore_errors=True)
    print(f"interop: all {len(wanted)} passed")


if __name__ == "__main__":
    main()

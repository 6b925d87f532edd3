"""One ACCEPT rule at the top of the FORWARD chain for connections our table DNATed.

Why a rule outside our table: libvirt 9.0 (Debian 12) writes its NAT network's firewall with
iptables (iptables-nft here, so nftables table `ip filter`, hook forward, priority 0), and its
LIBVIRT_FWI chain rejects every new connection into virbr0 that is not RELATED/ESTABLISHED. In
nftables an accept only ends the chain it is in: a packet accepted by a chain of our own table,
whatever its priority, still meets libvirt's reject, and a drop or reject anywhere is final. So
clients on other hosts reach a published port only if something in FORWARD accepts the DNATed
connection before LIBVIRT_FWI does (clients on the host itself never cross FORWARD).

The rule is the one docker also adds in its place: it matches only connections carrying our
table's conntrack mark bit, it is added with the same `iptables` command libvirt uses (so it
lands in the same backend, nft or legacy), it is kept first (libvirt inserts its jumps at the
top when it creates them), and it is removed with our table. Without an `iptables` command there
are no libvirt iptables rules to get past, so there is nothing to do.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

IPTABLES = "iptables"
_COMMENT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ForwardRuleError(RuntimeError):
    """iptables refused to list, add or delete the rule."""


@dataclass(frozen=True)
class ForwardRule:
    mark: int
    comment: str = "herdsman-published-ports"
    chain: str = "FORWARD"
    iptables: str = IPTABLES

    def __post_init__(self) -> None:
        if not _COMMENT_RE.match(self.comment):
            raise ValueError(f"{self.comment!r}: the rule's comment is one word")

    @property
    def spec(self) -> list[str]:
        mark = f"{self.mark:#x}/{self.mark:#x}"
        return ["-m", "connmark", "--mark", mark, "-m", "conntrack", "--ctstate", "DNAT",
                "-m", "comment", "--comment", self.comment, "-j", "ACCEPT"]

    def available(self) -> bool:
        return shutil.which(self.iptables) is not None

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.iptables, "-w", *args], capture_output=True, text=True, timeout=30, check=False)

    def _rules(self) -> list[str]:
        proc = self._run("-S", self.chain)
        if proc.returncode != 0:
            raise ForwardRuleError(f"{self.iptables} -S {self.chain}: {proc.stderr.strip()}")
        return [line for line in proc.stdout.splitlines() if line.startswith(f"-A {self.chain} ")]

    def _ours(self, line: str) -> bool:
        return f"--comment {self.comment} " in f"{line} " or f'--comment "{self.comment}" ' in f"{line} "

    def position(self) -> list[int]:
        """1-based positions of our rule in the chain (one, first, when all is well)."""
        return [i + 1 for i, line in enumerate(self._rules()) if self._ours(line)]

    def ensure(self) -> bool:
        """Make our rule the chain's first, exactly once. False when there is no iptables."""
        if not self.available():
            return False
        if self.position() == [1]:
            return True
        self._delete_all()
        proc = self._run("-I", self.chain, "1", *self.spec)
        if proc.returncode != 0:
            raise ForwardRuleError(f"{self.iptables} -I {self.chain}: {proc.stderr.strip()}")
        return True

    def remove(self) -> None:
        if self.available():
            self._delete_all()

    def _delete_all(self) -> None:
        """Delete each copy by its own text (not its position, which libvirt may shift meanwhile;
        not by our current spec, which an older copy with another mark would not match)."""
        for line in self._rules():
            if self._ours(line):
                proc = self._run("-D", *shlex.split(line)[1:])
                if proc.returncode != 0:
                    raise ForwardRuleError(f"{self.iptables} -D {self.chain}: {proc.stderr.strip()}")

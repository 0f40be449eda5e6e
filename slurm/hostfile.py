"""Turn a Slurm nodelist (`SLURM_JOB_NODELIST`) into host names, a DeepSpeed hostfile and a master address.

The expansion is pure Python, so it works (and is tested) without Slurm: `node[01-03,07]`,
`a1,b[2-3]`, `gpu-[1-2]-ib` and several bracket groups such as `n[1-2]-[3-4]` (expanded like Slurm:
left group outermost). Zero padding follows the range's lower bound, as Slurm does (`n[08-10]` →
`n08 n09 n10`). `hostnames(..., prefer_scontrol=True)` asks `scontrol show hostnames` when it is on
PATH, for site-specific forms this parser does not know.

Command line (used by the sbatch scripts):
    python slurm/hostfile.py [--nodelist L] [--slots N] [--out FILE] [--master] [--hosts]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_HOST_CHARS = re.compile(r"^[A-Za-z0-9._\-]+$")


class NodelistError(ValueError):
    """A nodelist that is not in Slurm's compact hostlist syntax."""


def split_top_level(nodelist: str) -> list[str]:
    """Split at commas that are outside brackets: `a1,b[2-3]` → `['a1', 'b[2-3]']`."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise NodelistError(f"nested '[' at position {i} in nodelist {nodelist!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise NodelistError(f"']' without '[' at position {i} in nodelist {nodelist!r}")
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise NodelistError(f"unclosed '[' in nodelist {nodelist!r}")
    parts.append(nodelist[start:])
    return [p.strip() for p in parts]


def expand_range_group(group: str, nodelist: str) -> list[str]:
    """Expand the inside of one bracket group: `01-03,07` → `['01', '02', '03', '07']`."""
    values = []
    for item in group.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise NodelistError(f"bad range {item!r} in [{group}] of nodelist {nodelist!r} "
                                f"(expected N or N-M with digits)")
        low_text, high_text = match.group(1), match.group(2) or match.group(1)
        low, high = int(low_text), int(high_text)
        if high < low:
            raise NodelistError(f"range {item!r} in nodelist {nodelist!r} goes backwards")
        width = len(low_text)
        values.extend(str(n).zfill(width) for n in range(low, high + 1))
    return values


def expand_host_expression(expr: str, nodelist: str) -> list[str]:
    """Expand one comma-free host expression with any number of bracket groups."""
    pieces = re.split(r"(\[[^\]]*\])", expr)
    choices: list[list[str]] = []
    for piece in pieces:
        if piece.startswith("["):
            choices.append(expand_range_group(piece[1:-1], nodelist))
        elif piece:
            if not _HOST_CHARS.match(piece):
                raise NodelistError(f"invalid characters in {piece!r} of nodelist {nodelist!r}")
            choices.append([piece])
    return ["".join(combo) for combo in itertools.product(*choices)]


def expand_nodelist(nodelist: str) -> list[str]:
    """All host names of a compact nodelist, in Slurm's order, duplicates dropped."""
    if not nodelist or not nodelist.strip():
        raise NodelistError("empty nodelist (is SLURM_JOB_NODELIST set? run inside a Slurm allocation)")
    hosts: list[str] = []
    for expr in split_top_level(nodelist.strip()):
        if not expr:
            raise NodelistError(f"empty host name between commas in nodelist {nodelist!r}")
        hosts.extend(expand_host_expression(expr, nodelist))
    return list(dict.fromkeys(hosts))


def hostnames(nodelist: str, prefer_scontrol: bool = False) -> list[str]:
    """Host names of `nodelist`; from `scontrol show hostnames` if asked and available, else parsed here."""
    if prefer_scontrol and shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                capture_output=True, text=True, check=False)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.split()
    return expand_nodelist(nodelist)


def format_hostfile(hosts: list[str], slots: int) -> str:
    """DeepSpeed hostfile text: one `host slots=N` line per node."""
    if slots < 1:
        raise ValueError(f"slots per node must be at least 1, got {slots}")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def write_hostfile(path: Path, hosts: list[str], slots: int) -> Path:
    """Write the DeepSpeed hostfile for `hosts` to `path` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_hostfile(hosts, slots))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST", ""),
                        help="compact nodelist (default: $SLURM_JOB_NODELIST)")
    parser.add_argument("--slots", type=int, default=1, help="ranks per node written as slots=N")
    parser.add_argument("--out", type=Path, help="write a DeepSpeed hostfile here")
    parser.add_argument("--master", action="store_true", help="print the first host (the master address)")
    parser.add_argument("--hosts", action="store_true", help="print the host names, one per line")
    parser.add_argument("--no-scontrol", action="store_true", help="never call scontrol; parse here")
    args = parser.parse_args(argv)
    try:
        hosts = hostnames(args.nodelist, prefer_scontrol=not args.no_scontrol)
        if args.out:
            write_hostfile(args.out, hosts, args.slots)
    except (NodelistError, ValueError) as err:
        print(f"hostfile.py: {err}", file=sys.stderr)
        return 2
    if args.master:
        print(hosts[0])
    if args.hosts:
        print("\n".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

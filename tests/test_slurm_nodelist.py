"""slurm/hostfile.py: Slurm nodelists → host names, DeepSpeed hostfile and master address (no Slurm needed)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HOSTFILE_PY = Path(__file__).resolve().parents[1] / "slurm" / "hostfile.py"
_spec = importlib.util.spec_from_file_location("slurm_hostfile", HOSTFILE_PY)
hostfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostfile)

CASES = [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("gpu-[1-2]-ib", ["gpu-1-ib", "gpu-2-ib"]),
    ("n[1-2]-[3-4]", ["n1-3", "n1-4", "n2-3", "n2-4"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("x[9-11]", ["x9", "x10", "x11"]),
    ("c[1,3],d7,e[001-002]", ["c1", "c3", "d7", "e001", "e002"]),
    ("rack1-node[5]", ["rack1-node5"]),
    ("host.example.org,n[1-2]", ["host.example.org", "n1", "n2"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[1-2],n[2-3]", ["n1", "n2", "n3"]),
]


@pytest.mark.parametrize(("nodelist", "expected"), CASES)
def test_compact_nodelists_expand_to_slurm_order(nodelist: str, expected: list[str]) -> None:
    assert hostfile.expand_nodelist(nodelist) == expected


@pytest.mark.parametrize(("nodelist", "expected"), CASES)
def test_expansion_is_idempotent_on_expanded_lists(nodelist: str, expected: list[str]) -> None:
    assert hostfile.expand_nodelist(",".join(expected)) == expected


@pytest.mark.parametrize("nodelist", ["node[01-03,07]", "a1,b[2-3]", "n[1-2]-[3-4]", "n[08-10]", "x[9-11]",
                                      "c[1,3],d7,e[001-002]"])
def test_expansion_matches_scontrol_show_hostnames(nodelist: str, tmp_path) -> None:
    if not shutil.which("scontrol"):
        pytest.skip("scontrol not installed: nothing to compare against")
    # scontrol reads a slurm.conf before it expands anything, even with no cluster running: give it a minimal one
    # (a machine with Slurm installed but no cluster configured yet has none).
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=nodelist\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1 State=UNKNOWN\n"
                    "PartitionName=p Nodes=localhost Default=YES\n")
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                            env={**os.environ, "SLURM_CONF": str(conf)})
    assert result.returncode == 0, result.stderr
    assert hostfile.expand_nodelist(nodelist) == result.stdout.split()


@pytest.mark.parametrize(("nodelist", "message"), [
    ("", "empty nodelist"),
    ("node[1-3", "unclosed '['"),
    ("node1-3]", "']' without '['"),
    ("node[[1]]", "nested"),
    ("node[3-1]", "goes backwards"),
    ("node[a-b]", "bad range 'a-b'"),
    ("node[1-]", "bad range '1-'"),
    ("a,,b", "empty host name"),
    ("bad host", "invalid characters"),
])
def test_malformed_nodelists_raise_naming_the_problem(nodelist: str, message: str) -> None:
    with pytest.raises(hostfile.NodelistError, match=re.escape(message)) as info:
        hostfile.expand_nodelist(nodelist)
    if nodelist:
        assert repr(nodelist) in str(info.value)


def test_hostfile_has_one_line_per_node_with_slots(tmp_path: Path) -> None:
    path = hostfile.write_hostfile(tmp_path / "run" / "hostfile", hostfile.expand_nodelist("a1,b[2-3]"), 4)
    assert path.read_text().splitlines() == ["a1 slots=4", "b2 slots=4", "b3 slots=4"]


def test_zero_slots_is_refused() -> None:
    with pytest.raises(ValueError, match="slots per node must be at least 1, got 0"):
        hostfile.format_hostfile(["a"], 0)


def test_cli_reads_slurm_job_nodelist_and_prints_master(tmp_path: Path) -> None:
    out = tmp_path / "hostfile"
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(HOSTFILE_PY), "--slots", "2", "--out", str(out), "--master"],
                            capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "gpu07"
    assert out.read_text() == "gpu07 slots=2\ngpu08 slots=2\n"


def test_cli_fails_with_exit_2_and_a_message_on_a_bad_nodelist() -> None:
    result = subprocess.run([sys.executable, str(HOSTFILE_PY), "--nodelist", "n[2-1]", "--hosts"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "goes backwards" in result.stderr


def test_cli_falls_back_to_the_parser_when_scontrol_rejects_a_form() -> None:
    # Slurm 22.05's scontrol refuses text after a bracket ("gpu-[1-2]-ib"); the parser handles it.
    result = subprocess.run([sys.executable, str(HOSTFILE_PY), "--nodelist", "gpu-[1-2]-ib", "--hosts"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["gpu-1-ib", "gpu-2-ib"]

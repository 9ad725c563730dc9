"""common.machine's CPU budget on fake cgroup trees: the affinity mask and the cgroup CPU quota (v2 and v1), the
smaller one wins, and the log line says which."""

import os

import pytest

from common.machine import cgroup_quota, cpu_budget, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "200000 100000\n"}, 2.0),  # v2: 2 CPUs
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1, joined
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
    ({"cpu.max": "garbage\n"}, None),  # unreadable: no quota assumed
    ({}, None),  # no cgroup files at all (not Linux, or not mounted)
])
def test_cgroup_quota_v1_and_v2(tmp_path, files, quota):
    assert cgroup_quota(cgroup(tmp_path, files))[0] == quota


def test_the_quota_caps_a_wide_affinity_mask(tmp_path, monkeypatch):
    """A 2-vCPU container whose affinity mask lists all 64 host cores: 2 threads, and the line says why."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    root = cgroup(tmp_path, {"cpu.max": "200000 100000\n"})
    assert usable_cpus(root) == 2
    assert cpu_budget(root).describe() == (f"threads: 2 (the cgroup quota, 2 CPUs in {root / 'cpu.max'}; the "
                                           "affinity mask allows 64)")


def test_the_affinity_mask_caps_a_loose_quota(tmp_path):
    root = cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": str(400000 * AFFINITY), "cpu/cpu.cfs_period_us": "100000"})
    assert usable_cpus(root) == AFFINITY
    assert cpu_budget(root).describe().startswith(f"threads: {AFFINITY} (the affinity mask; cgroup quota ")


def test_a_quota_below_one_cpu_still_gives_one_thread(tmp_path):
    assert usable_cpus(cgroup(tmp_path, {"cpu.max": "20000 100000"})) == 1
    assert usable_cpus(cgroup(tmp_path / "none", {})) == AFFINITY

"""Device discovery on fake /proc and cgroup trees (cores, memory, reserve, caps, GPUs),
and how devices are shown (tables, Prometheus gauges)."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smss.api.metrics import PrometheusMetrics
from smss.cli.tables import devices_table, placed_text
from smss.errors import InvalidSpec
from smss.inventory import Allocation, Capacity, Device, DeviceReport, NodeInventory, amount_text, memory_text
from smss.node.devices import (
    Gpu,
    cpu_device,
    discover,
    host,
    memory_reserve_mb,
    parse_nvidia_smi,
    probe_gpus,
    visible_gpus,
)

GIB_KB = 1 << 20  # 1 GiB in /proc/meminfo's kB


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _machine(root: Path, mem_gib: int = 16, cgroup: str = "0::/\n") -> Path:
    _write(root, "proc/meminfo", f"MemTotal:       {mem_gib * GIB_KB} kB\nMemFree:  1 kB\n")
    _write(root, "proc/self/cgroup", cgroup)
    _write(root, "proc/cpuinfo", "processor\t: 0\nmodel name\t: Fake CPU @ 3GHz\n")
    return root


def _no_gpus() -> list[Gpu]:
    return []


def test_plain_machine_uses_affinity_and_memtotal(tmp_path: Path) -> None:
    root = _machine(tmp_path, mem_gib=16)
    inv = discover(root=root, affinity=lambda: 8, gpus=_no_gpus)
    assert inv.node == "local"
    assert [d.key for d in inv.devices] == ["cpu:0"]
    cpu = inv.cpu
    assert cpu.name == "Fake CPU @ 3GHz"
    assert cpu.total == Capacity(cpu=8.0, memory_mb=16384)
    # 512 MiB + 5 % of 16384 MiB = 512 + 819
    assert cpu.reserved == Capacity(memory_mb=1331)
    assert cpu.capacity == Capacity(cpu=8.0, memory_mb=16384 - 1331)


def test_cgroup_v2_quota_and_memory_limit(tmp_path: Path) -> None:
    root = _machine(tmp_path, mem_gib=64, cgroup="0::/kubepods/pod1\n")
    _write(root, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    _write(root, "sys/fs/cgroup/kubepods/pod1/cpu.max", "150000 100000\n")
    _write(root, "sys/fs/cgroup/kubepods/pod1/memory.max", "max\n")
    # A parent's limit binds the child too.
    _write(root, "sys/fs/cgroup/kubepods/memory.max", f"{4 << 30}\n")
    machine = host(root, affinity=lambda: 16)
    assert (machine.cores, machine.cores_source) == (1.5, "cgroup v2 cpu.max")
    assert (machine.memory_mb, machine.memory_source) == (4096, "cgroup v2 memory.max")


def test_cgroup_v2_unlimited_leaves_the_machine(tmp_path: Path) -> None:
    root = _machine(tmp_path, mem_gib=8)
    _write(root, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    _write(root, "sys/fs/cgroup/cpu.max", "max 100000\n")
    _write(root, "sys/fs/cgroup/memory.max", "max\n")
    machine = host(root, affinity=lambda: 4)
    assert (machine.cores, machine.memory_mb) == (4.0, 8192)
    assert (machine.cores_source, machine.memory_source) == ("CPU affinity", "MemTotal")


def test_cgroup_v1_cfs_quota_and_limit(tmp_path: Path) -> None:
    root = _machine(tmp_path, mem_gib=32, cgroup="4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n")
    _write(root, "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n")
    _write(root, "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    _write(root, "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", f"{3 << 30}\n")
    _write(root, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    machine = host(root, affinity=lambda: 8)
    assert (machine.cores, machine.cores_source) == (2.0, "cgroup v1 cpu.cfs_quota_us")
    assert (machine.memory_mb, machine.memory_source) == (3072, "cgroup v1 memory.limit_in_bytes")


def test_cgroup_v1_no_quota_and_namespaced_path(tmp_path: Path) -> None:
    """-1: no quota; the process's path not visible under the mount (own namespace): the mount."""
    root = _machine(tmp_path, mem_gib=32, cgroup="4:memory:/outside/xyz\n1:cpu:/outside/xyz\n")
    _write(root, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    _write(root, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    _write(root, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{2 << 30}\n")
    machine = host(root, affinity=lambda: 2)
    assert (machine.cores, machine.memory_mb) == (2.0, 2048)


def test_affinity_below_quota_wins(tmp_path: Path) -> None:
    root = _machine(tmp_path)
    _write(root, "sys/fs/cgroup/cgroup.controllers", "cpu\n")
    _write(root, "sys/fs/cgroup/cpu.max", "800000 100000\n")
    assert host(root, affinity=lambda: 3).cores == 3.0


def test_garbage_cgroup_files_are_ignored(tmp_path: Path) -> None:
    root = _machine(tmp_path, mem_gib=8)
    _write(root, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    _write(root, "sys/fs/cgroup/cpu.max", "lots\n")
    _write(root, "sys/fs/cgroup/memory.max", "?\n")
    machine = host(root, affinity=lambda: 4)
    assert (machine.cores, machine.memory_mb) == (4.0, 8192)


def test_reserve_rule() -> None:
    assert memory_reserve_mb(16384) == 512 + 819
    assert memory_reserve_mb(1 << 20) == 512 + 52428
    assert memory_reserve_mb(400) == 400  # never more than there is


def test_operator_caps_replace_the_reserve(tmp_path: Path) -> None:
    root = _machine(tmp_path, mem_gib=16)
    cpu = discover(root=root, affinity=lambda: 8, gpus=_no_gpus, cpus=1, memory_mb=2048).cpu
    assert cpu.total == cpu.capacity == Capacity(cpu=1.0, memory_mb=2048)
    assert cpu.reserved == Capacity()
    # Only memory capped: the CPU is the machine's, memory the operator's amount.
    cpu = discover(root=root, affinity=lambda: 8, gpus=_no_gpus, memory_mb=16384).cpu
    assert cpu.capacity == Capacity(cpu=8.0, memory_mb=16384)
    # Only cores capped: memory keeps its reserve.
    cpu = discover(root=root, affinity=lambda: 8, gpus=_no_gpus, cpus=2.5).cpu
    assert cpu.capacity == Capacity(cpu=2.5, memory_mb=16384 - 1331)


@pytest.mark.parametrize(
    ("cpus", "memory_mb", "message"),
    [
        (9, None, "--cpus 9 is more than this machine has: 8 cores (CPU affinity)"),
        (None, 16385, "--memory 16385 MiB is more than this machine has: 16384 MiB (MemTotal)"),
        (0, None, "--cpus must be a positive number of cores"),
        (float("nan"), None, "--cpus must be a positive number of cores"),
        (None, 0, "--memory must be at least 1 MiB"),
    ],
)
def test_caps_beyond_the_machine_are_refused(
    tmp_path: Path, cpus: float | None, memory_mb: int | None, message: str
) -> None:
    machine = host(_machine(tmp_path, mem_gib=16), affinity=lambda: 8)
    with pytest.raises(InvalidSpec, match=message.replace("(", r"\(").replace(")", r"\)")):
        cpu_device(machine, cpus=cpus, memory_mb=memory_mb)


SMI = """\
0, GPU-11111111-2222-3333-4444-555555555555, NVIDIA H200, 143771, 143180
1, GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee, NVIDIA A100-SXM4-80GB, 81920, [N/A]
"""


def test_parse_nvidia_smi() -> None:
    assert parse_nvidia_smi(SMI) == [
        Gpu(0, "GPU-11111111-2222-3333-4444-555555555555", "NVIDIA H200", 143771, 143180),
        Gpu(1, "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "NVIDIA A100-SXM4-80GB", 81920, None),
    ]
    assert parse_nvidia_smi("") == []
    assert parse_nvidia_smi("\n") == []


@pytest.mark.parametrize("text", ["No devices were found", "0, GPU-1, x, lots, 1", "0, a, b"])
def test_parse_nvidia_smi_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_nvidia_smi(text)


def test_gpus_become_cuda_devices(tmp_path: Path) -> None:
    root = _machine(tmp_path)
    inv = discover(root=root, affinity=lambda: 8, gpus=lambda: parse_nvidia_smi(SMI))
    assert [d.key for d in inv.devices] == ["cpu:0", "cuda:0", "cuda:1"]
    h200 = inv.device("cuda", 0)
    assert h200 is not None
    assert h200.name == "NVIDIA H200"
    assert h200.capacity == h200.total == Capacity(gpu=1.0, gpu_memory_mb=143771)
    assert h200.reserved == Capacity()
    assert h200.free_memory_mb == 143180
    a100 = inv.device("cuda", 1)
    assert a100 is not None
    assert a100.free_memory_mb is None


def test_gpu_discovery_failure_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[Gpu]:
        raise RuntimeError("nvidia-smi exited with 9: NVIDIA-SMI has failed")

    with caplog.at_level(logging.WARNING, logger="smss.node.devices"):
        inv = discover(root=_machine(tmp_path), affinity=lambda: 8, gpus=broken)
    assert [d.key for d in inv.devices] == ["cpu:0"]
    assert "GPU discovery failed" in caplog.text
    assert "NVIDIA-SMI has failed" in caplog.text


def test_cuda_visible_devices() -> None:
    gpus = parse_nvidia_smi(SMI)
    assert visible_gpus(gpus, None) == gpus
    assert visible_gpus(gpus, "") == []
    assert [g.index for g in visible_gpus(gpus, "1")] == [1]
    assert [g.index for g in visible_gpus(gpus, "1,0")] == [1, 0]
    assert [g.index for g in visible_gpus(gpus, "GPU-aaaa")] == [1]
    # As CUDA does: the list ends at the first entry naming no GPU.
    assert [g.index for g in visible_gpus(gpus, "0,7,1")] == [0]
    assert visible_gpus(gpus, "-1") == []


def test_discover_on_this_machine_has_a_cpu() -> None:
    """The real sources (no GPU probe: a unit test runs no subprocess)."""
    inv = discover(gpus=_no_gpus)
    cpu = inv.cpu
    assert cpu.capacity.cpu >= 1
    assert 0 < cpu.capacity.memory_mb < cpu.total.memory_mb


# ------------------------------------------------------------------ how devices are shown


def _reports() -> list[DeviceReport]:
    instance = Allocation(
        "mlp-ab12", "mlp", "instance", "local", Capacity(cpu=1.0, memory_mb=512), evictable=True
    )
    weights = Allocation("weights:mlp", "mlp", "weights", "local", Capacity(memory_mb=64))
    on_gpu = Allocation(
        "cnn-9f", "cnn", "instance", "local", Capacity(cpu=0.5), Capacity(gpu=0.5, gpu_memory_mb=4096), 0
    )
    cpu_cap = Capacity(cpu=2.0, memory_mb=22835)
    gpu_cap = Capacity(gpu=1.0, gpu_memory_mb=81920)
    return [
        DeviceReport(
            "local",
            "cpu",
            0,
            "Fake CPU",
            cpu_cap,
            Capacity(cpu=2.0, memory_mb=24576),
            Capacity(memory_mb=1741),
            Capacity(cpu=1.5, memory_mb=576),
            (instance, weights, on_gpu),
        ),
        DeviceReport(
            "local",
            "cuda",
            0,
            "NVIDIA A100",
            gpu_cap,
            gpu_cap,
            Capacity(),
            Capacity(gpu=0.5, gpu_memory_mb=4096),
            (on_gpu,),
            80000,
        ),
    ]


def test_amount_and_memory_text() -> None:
    assert memory_text(512) == "512 MiB"
    assert memory_text(2048) == "2 GiB"
    assert memory_text(22835) == "22.3 GiB"
    assert amount_text("cpu", Capacity(cpu=2.0, memory_mb=22835)) == "2 cores, 22.3 GiB"
    assert amount_text("cpu", Capacity(cpu=1.0, memory_mb=2048)) == "1 core, 2 GiB"
    assert amount_text("cuda", Capacity(gpu=1.0, gpu_memory_mb=81920)) == "1 GPU, 80 GiB"
    assert amount_text("cuda", Capacity(gpu=0.5, gpu_memory_mb=4096)) == "0.5 GPUs, 4 GiB"


def test_placed_text() -> None:
    assert placed_text(_reports()[0].placed) == "mlp-ab12 (instance), weights:mlp, cnn-9f (instance)"
    assert placed_text(()) == "-"


def test_devices_table_rows() -> None:
    table = devices_table(_reports(), title="devices")
    assert [c.header for c in table.columns] == [
        "node",
        "device",
        "name",
        "capacity",
        "allocated",
        "free",
        "placed",
    ]
    rows = list(zip(*(list(map(str, c.cells)) for c in table.columns), strict=True))
    cpu = ("local", "cpu:0", "Fake CPU", "2 cores, 22.3 GiB", "1.5 cores, 576 MiB", "0.5 cores, 21.7 GiB")
    assert rows[0][:6] == cpu
    assert rows[1][1:6] == ("cuda:0", "NVIDIA A100", "1 GPU, 80 GiB", "0.5 GPUs, 4 GiB", "0.5 GPUs, 76 GiB")
    assert rows[1][6] == "cnn-9f (instance)"


def _device_samples(text: bytes) -> dict[tuple[str, str, str, str, str], float]:
    return {
        (s.name, s.labels["node"], s.labels["kind"], s.labels["index"], s.labels["resource"]): s.value
        for family in text_string_to_metric_families(text.decode())
        if family.name.startswith("smss_device_")
        for s in family.samples
    }


def test_metrics_expose_capacity_and_allocation_per_resource_of_the_kind() -> None:
    metrics = PrometheusMetrics()
    cap, alloc = "smss_device_capacity", "smss_device_allocated"
    assert _device_samples(metrics.render({}, _reports())) == {
        (cap, "local", "cpu", "0", "cpu"): 2.0,
        (cap, "local", "cpu", "0", "memory_mb"): 22835.0,
        (alloc, "local", "cpu", "0", "cpu"): 1.5,
        (alloc, "local", "cpu", "0", "memory_mb"): 576.0,
        (cap, "local", "cuda", "0", "gpu"): 1.0,
        (cap, "local", "cuda", "0", "gpu_memory_mb"): 81920.0,
        (alloc, "local", "cuda", "0", "gpu"): 0.5,
        (alloc, "local", "cuda", "0", "gpu_memory_mb"): 4096.0,
    }
    # A device no longer reported is gone at the next scrape.
    assert {k[2] for k in _device_samples(metrics.render({}, _reports()[:1]))} == {"cpu"}


class _FakeNvml(types.ModuleType):
    """What probe_gpus uses of pynvml: one GPU (old versions answer bytes for names)."""

    class NVMLError_LibraryNotFound(Exception):
        pass

    def __init__(self, *, driver: bool = True) -> None:
        super().__init__("pynvml")
        self.driver = driver
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if not self.driver:
            raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return "GPU-0000"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=143771 << 20, free=100000 << 20, used=43771 << 20)


def test_nvml_is_used_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert probe_gpus() == [Gpu(0, "GPU-0000", "NVIDIA H200", 143771, 100000)]
    assert fake.calls == ["init", "shutdown"]


def test_nvml_without_a_driver_is_no_gpus_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(driver=False))
    with caplog.at_level(logging.WARNING, logger="smss.node.devices"):
        inv = discover(root=_machine(tmp_path), affinity=lambda: 2)
    assert [d.key for d in inv.devices] == ["cpu:0"]
    assert caplog.text == ""


def test_weight_store_budget_follows_the_nodes_memory_capacity() -> None:
    from smss.node.agent import default_weight_budget

    cap = Capacity(cpu=2, memory_mb=8192)
    node = NodeInventory("n", (Device("cpu", 0, "cpu", cap, cap),))
    assert default_weight_budget(node) == 2 << 30

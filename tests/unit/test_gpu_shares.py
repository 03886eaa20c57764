"""Caps from shares, MPS settings, and the layout of a model's one buffer on a device."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smss.errors import StartFailed
from smss.node.gpu.layout import ALIGN, plan
from smss.node.gpu.shares import (
    DEFAULT_CONTEXT_MB,
    MIN_ALLOCATOR_MB,
    GpuShare,
    allocator_cap,
    mps_running,
    mps_thread_percentage,
    process_env,
    share_of,
)
from smss.safetensors_header import ITEMSIZE, Header, TensorEntry
from smss.spec import Resources

H200_MB = 143771


def test_a_declared_gpu_memory_is_the_share_and_the_fraction_the_compute() -> None:
    assert share_of(Resources(gpu_memory_mb=2048), H200_MB) == GpuShare(2048, None)
    assert share_of(Resources(gpu=0.25, gpu_memory_mb=2048), H200_MB) == GpuShare(2048, 0.25)


def test_a_fraction_alone_is_that_fraction_of_the_devices_memory_too() -> None:
    assert share_of(Resources(gpu=0.25), 80 * 1024) == GpuShare(20 * 1024, 0.25)


@given(st.integers(1, 200_000), st.integers(8 * 1024, 200_000), st.one_of(st.none(), st.integers(0, 4096)))
def test_the_allocator_cap_plus_the_context_never_exceeds_the_share(
    share_mb: int, total_mb: int, context_mb: int | None
) -> None:
    share = GpuShare(share_mb)
    context = DEFAULT_CONTEXT_MB if context_mb is None else context_mb
    if share_mb - context < MIN_ALLOCATOR_MB:
        with pytest.raises(StartFailed, match=f"at least {context + MIN_ALLOCATOR_MB} MiB"):
            allocator_cap(share, total_mb, context_mb)
        return
    cap = allocator_cap(share, total_mb, context_mb)
    assert 0 < cap.fraction <= 1
    assert cap.cap_mb + cap.context_mb == share_mb
    # What torch enforces is fraction x total memory: no more than the share's cap.
    assert cap.fraction * total_mb <= cap.cap_mb + 1e-6


def test_the_cap_is_what_set_per_process_memory_fraction_gets() -> None:
    cap = allocator_cap(GpuShare(2048), 81920, 448)
    assert (cap.cap_mb, cap.context_mb) == (1600, 448)
    assert cap.fraction == pytest.approx(1600 / 81920)


def test_a_share_beyond_the_device_is_capped_at_all_of_it() -> None:
    assert allocator_cap(GpuShare(100_000), 8192, 0).fraction == 1.0


@pytest.mark.parametrize(
    ("compute", "percent"), [(None, None), (0.25, 25), (0.001, 1), (1.0, 100), (0.333, 34)]
)
def test_the_mps_thread_percentage_comes_from_the_compute_share(
    compute: float | None, percent: int | None
) -> None:
    assert mps_thread_percentage(GpuShare(1024, compute)) == percent


def test_mps_is_found_by_its_control_pipe(tmp_path: Path) -> None:
    assert not mps_running({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    (tmp_path / "control").touch()
    assert mps_running({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    assert mps_running({}, exists=lambda p: p == Path("/tmp/nvidia-mps/control"))


def test_a_gpu_process_sees_its_one_gpu_by_its_nvml_index_with_its_percentage() -> None:
    env = process_env(3, 25)
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # NVML's order, not CUDA's fastest-first
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in process_env(0, None)


dtypes = st.sampled_from(sorted(ITEMSIZE))


@st.composite
def headers(draw: st.DrawFn) -> Header:
    start = 8 + draw(st.integers(0, 64)) * 8
    tensors = []
    at = start
    for k in range(draw(st.integers(0, 12))):
        dtype = draw(dtypes)
        shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        tensors.append(TensorEntry(f"t{k}", dtype, shape, at, at + nbytes))
        at += nbytes
    return Header(start, tuple(tensors))


@given(headers())
def test_every_tensor_gets_an_aligned_slot_of_its_own_size_and_no_two_overlap(header: Header) -> None:
    layout = plan(header)
    assert layout.nbytes % ALIGN == 0
    end = 0
    for slot, t in zip(layout.slots, header.tensors, strict=True):
        assert slot.offset % ALIGN == 0  # a view of any dtype there is aligned
        assert slot.offset >= end
        assert (slot.source, slot.nbytes, slot.dtype, slot.shape) == (
            t.start,
            t.end - t.start,
            t.dtype,
            t.shape,
        )
        end = slot.offset + slot.nbytes
    assert end <= layout.nbytes


def test_an_allocation_refused_by_the_cap_is_a_clear_error_of_that_instance() -> None:
    pytest.importorskip("torch")
    from smss.node.gpu.device import GpuShareExceeded, HostMemory
    from smss.node.gpu.shares import AllocatorCap
    from smss.node.gpu.standby import CappedModel

    class Greedy:
        def predict(self, inputs: dict[str, object]) -> dict[str, object]:
            if inputs.get("greedy"):
                raise MemoryError("tried to allocate 4.00 GiB")
            raise ValueError("a bug of the model's own")

    model = CappedModel(Greedy(), HostMemory(8192), "cnn-1", AllocatorCap(0.0195, 1600, 448))
    with pytest.raises(
        GpuShareExceeded, match=r"cnn-1 exceeded its GPU memory share: torch may allocate 1600 MiB"
    ):
        model.predict({"greedy": True})
    with pytest.raises(ValueError, match="own"):  # anything else is the model's error, unchanged
        model.predict({})

"""Device kinds taken from spec sheets, the links between them, and ready-made cluster presets.

This module is data (one cited entry per board, link and preset), so it stays whole past 500 lines.

A ``DeviceKind`` is what the planner's cost model needs to know about one kind of hardware:
a compute roofline (``peak_flops`` x ``efficiency`` against ``memory_bandwidth``), a fixed
per-operator cost (``overhead_s``) and how much memory a training process can have.

FP32 peaks are derived, not copied from marketing tables (which usually quote FP16/INT8):
  GPU:  CUDA cores x 2 (one fused multiply-add = 2 FLOP) x the datasheet's maximum GPU clock
  CPU:  cores x FP32 FLOP per cycle per core (SIMD lanes x FMA pipes x 2) x clock
Every kind's ``source`` names the document the raw numbers come from and shows the arithmetic.

Memory sizes are binary (``4 * GiB``): DRAM parts come in powers of two, and "4 GB" on a
Jetson datasheet is 4 GiB of LPDDR4. Bandwidths are decimal (GB/s = 1e9 B/s), as vendors state them.

``efficiency`` is the fraction of peak that PyTorch training kernels reach on the compute-bound
part of the roofline. Reasoning behind the values used below:
  * data-centre GPUs (A100/H100, plain FP32 without TF32): cuBLAS SGEMM reaches 80-90 % of peak
    on large square GEMMs, but training mixes in convolutions with awkward shapes, small batch
    dimensions and backward kernels (weight gradients), so 0.5 is a realistic whole-model average.
  * edge / laptop GPUs: the same kernels plus small per-device batches (pipeline micro-batches
    split further by data parallelism) that under-fill the SMs, and DVFS/thermal throttling on
    passively cooled modules: 0.35-0.4.
  * CPUs: PyTorch's CPU GEMMs (oneDNN / OpenBLAS) reach 50-70 % of peak on big GEMMs, but
    convolutions via im2col, backward passes and ops that fall back to scalar loops pull a whole
    model to 20-35 %; the Raspberry Pi's A76 NEON path is less tuned than x86 AVX2, hence 0.25.
Memory-bound operators are charged through ``memory_bandwidth`` instead, so ``efficiency`` does
not have to absorb them.

``overhead_s`` is the fixed cost every operator pays regardless of size: CUDA kernel launch plus
the PyTorch dispatcher on the host CPU for GPUs (larger on Jetsons, whose ARM host cores are slow),
dispatcher only for CPUs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from asteroid_fx.ir.errors import InputError

if TYPE_CHECKING:  # cluster.py imports this module, so the runtime import is deferred
    from asteroid_fx.ir.cluster import Cluster

KiB = 1024
MiB = 1024**2
GiB = 1024**3

HOST_CPU = "host-cpu"


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    name: str  # catalog key, e.g. "jetson-nano"
    peak_flops: float  # FP32 FLOP/s of the unit training runs on (GPU on Jetsons, CPU on Pi/laptop)
    memory_bandwidth: float  # bytes/s of that unit's memory
    memory_bytes: int  # physical memory (shared CPU/GPU on Jetsons)
    efficiency: float  # fraction of peak_flops that training kernels reach (see module docstring)
    overhead_s: float  # fixed per-operator cost in seconds (launch + dispatch)
    source: str  # where the numbers come from, with the derivation
    short: str = ""  # prefix for generated device names ("nano" -> nano0, nano1); defaults to name

    def __post_init__(self) -> None:
        # Kinds can be added to KINDS by users, so bad numbers are caught here rather than as
        # nonsense (negative or infinite stage times) deep inside the planner.
        def bad(field: str, value: object, want: str) -> InputError:
            return InputError(f"device kind {self.name!r}: {field} must be {want}, got {value!r}")

        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"device kind name must be a non-empty string, got {self.name!r}")
        for field in ("peak_flops", "memory_bandwidth"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise bad(field, value, "a positive finite number")
        if not (isinstance(self.memory_bytes, int) and self.memory_bytes > 0):
            raise bad("memory_bytes", self.memory_bytes, "a positive integer number of bytes")
        if not (isinstance(self.efficiency, (int, float)) and 0 < self.efficiency <= 1):
            raise bad("efficiency", self.efficiency, "in (0, 1]")
        if not (isinstance(self.overhead_s, (int, float)) and 0 <= self.overhead_s < math.inf):
            raise bad("overhead_s", self.overhead_s, "a finite number of seconds >= 0")
        if not self.short:
            object.__setattr__(self, "short", self.name)

    @property
    def effective_flops(self) -> float:
        """FLOP/s a training kernel actually gets on the compute-bound side of the roofline."""
        return self.peak_flops * self.efficiency


def _gpu_peak(cores: int, clock_hz: float) -> float:
    return cores * 2 * clock_hz  # every CUDA core retires one FP32 FMA (2 FLOP) per cycle


def _cpu_peak(cores: int, flop_per_cycle: int, clock_hz: float) -> float:
    return cores * flop_per_cycle * clock_hz


_KIND_LIST = (
    DeviceKind(
        name="jetson-nano",
        short="nano",
        peak_flops=_gpu_peak(128, 921.6e6),  # 235.9 GFLOP/s
        memory_bandwidth=25.6e9,
        memory_bytes=4 * GiB,
        efficiency=0.35,
        overhead_s=50e-6,  # Cortex-A57 host at 1.43 GHz makes PyTorch dispatch slow
        source=(
            "NVIDIA Jetson Nano System-on-Module Data Sheet DA-09366-001: 128-core Maxwell GPU, "
            "max 921.6 MHz (472 GFLOPS FP16); 4 GB 64-bit LPDDR4-3200, 25.6 GB/s. "
            "FP32 = 128 cores x 2 (FMA) x 921.6 MHz = 235.9 GFLOP/s"
        ),
    ),
    DeviceKind(
        name="jetson-tx2",
        short="tx2-",
        peak_flops=_gpu_peak(256, 1.3e9),  # 665.6 GFLOP/s
        memory_bandwidth=59.7e9,
        memory_bytes=8 * GiB,
        efficiency=0.35,
        overhead_s=40e-6,
        source=(
            "NVIDIA Jetson TX2 Series Module Data Sheet DS-08580-001: 256-core Pascal GPU, "
            "max 1.3 GHz (1.33 TFLOPS FP16); 8 GB 128-bit LPDDR4-3733, 59.7 GB/s. "
            "FP32 = 256 cores x 2 (FMA) x 1.3 GHz = 665.6 GFLOP/s"
        ),
    ),
    DeviceKind(
        name="jetson-xavier-nx",
        short="xnx",
        peak_flops=_gpu_peak(384, 1.1e9),  # 844.8 GFLOP/s
        memory_bandwidth=51.2e9,
        memory_bytes=8 * GiB,
        efficiency=0.35,
        overhead_s=30e-6,
        source=(
            "NVIDIA Jetson Xavier NX Series Data Sheet DS-09693-001 (8 GB module): 384-core Volta "
            "GPU, max 1100 MHz; 8 GB 128-bit LPDDR4x, 51.2 GB/s. "
            "FP32 = 384 cores x 2 (FMA) x 1.1 GHz = 844.8 GFLOP/s (Tensor Cores unused in FP32)"
        ),
    ),
    DeviceKind(
        name="jetson-orin-nano",
        short="onano",
        peak_flops=_gpu_peak(1024, 625e6),  # 1.28 TFLOP/s
        memory_bandwidth=68e9,
        memory_bytes=8 * GiB,
        efficiency=0.4,
        overhead_s=20e-6,
        source=(
            "NVIDIA Jetson Orin Nano Series Data Sheet DS-11105-001 (8 GB module): 1024-core "
            "Ampere GPU, max 625 MHz; 8 GB 128-bit LPDDR5, 68 GB/s. "
            "FP32 = 1024 cores x 2 (FMA) x 625 MHz = 1.28 TFLOP/s. (JetPack 6.1 'Super' mode "
            "raises this to 1020 MHz / 102 GB/s; not assumed here)"
        ),
    ),
    DeviceKind(
        name="jetson-agx-orin",
        short="agx",
        peak_flops=_gpu_peak(2048, 1.3e9),  # 5.32 TFLOP/s
        memory_bandwidth=204.8e9,
        memory_bytes=64 * GiB,
        efficiency=0.4,
        overhead_s=15e-6,
        source=(
            "NVIDIA Jetson AGX Orin Series Data Sheet DS-10662-001 (64 GB module): 2048-core "
            "Ampere GPU, max 1.3 GHz; 64 GB 256-bit LPDDR5, 204.8 GB/s. "
            "FP32 = 2048 cores x 2 (FMA) x 1.3 GHz = 5.32 TFLOP/s"
        ),
    ),
    DeviceKind(
        name="jetson-agx-orin-32gb",
        short="agx32-",
        peak_flops=_gpu_peak(1792, 930e6),  # 3.33 TFLOP/s
        memory_bandwidth=204.8e9,
        memory_bytes=32 * GiB,
        efficiency=0.4,
        overhead_s=15e-6,
        source=(
            "NVIDIA Jetson AGX Orin Series Data Sheet DS-10662-001 (32 GB module): 1792-core "
            "Ampere GPU, max 930 MHz; 32 GB 256-bit LPDDR5, 204.8 GB/s. "
            "FP32 = 1792 cores x 2 (FMA) x 930 MHz = 3.33 TFLOP/s"
        ),
    ),
    DeviceKind(
        name="raspberry-pi-5",
        short="pi5-",
        peak_flops=_cpu_peak(4, 16, 2.4e9),  # 153.6 GFLOP/s
        memory_bandwidth=17.07e9,
        memory_bytes=8 * GiB,
        efficiency=0.25,
        overhead_s=10e-6,
        source=(
            "Raspberry Pi 5 product brief (Raspberry Pi Ltd): BCM2712, 4x Arm Cortex-A76 at "
            "2.4 GHz; LPDDR4X-4267, 8 GB model. Arm Cortex-A76 Software Optimization Guide: two "
            "128-bit NEON FMA pipes = 2 x 4 lanes x 2 = 16 FP32 FLOP/cycle. "
            "FP32 = 4 cores x 16 x 2.4 GHz = 153.6 GFLOP/s; "
            "bandwidth = 4267 MT/s x 32-bit bus = 17.07 GB/s"
        ),
    ),
    DeviceKind(
        name="laptop-i7",
        short="i7-",
        peak_flops=_cpu_peak(6, 32, 2.6e9),  # 499.2 GFLOP/s
        memory_bandwidth=46.9e9,
        memory_bytes=16 * GiB,
        efficiency=0.35,
        overhead_s=5e-6,
        source=(
            "Intel ARK, Core i7-10750H: 6 cores, base 2.6 GHz (max turbo 5.0 GHz), AVX2 with two "
            "FMA units per core = 2 x 8 lanes x 2 = 32 FP32 FLOP/cycle; DDR4-2933 dual channel. "
            "FP32 = 6 cores x 32 x 2.6 GHz (base: a 45 W laptop cannot hold turbo with all cores "
            "in AVX2) = 499.2 GFLOP/s; bandwidth = 2 ch x 8 B x 2933 MT/s = 46.9 GB/s; "
            "16 GB as configured in typical laptops"
        ),
    ),
    DeviceKind(
        name="rtx-3060-laptop",
        short="rtx3060-",
        peak_flops=_gpu_peak(3840, 1.703e9),  # 13.08 TFLOP/s
        memory_bandwidth=336e9,
        memory_bytes=6 * GiB,
        efficiency=0.4,
        overhead_s=10e-6,
        source=(
            "NVIDIA GeForce RTX 3060 Laptop GPU specifications (nvidia.com): 3840 CUDA cores, "
            "boost 1283-1703 MHz depending on TGP; 6 GB GDDR6, 192-bit at 14 Gbps = 336 GB/s. "
            "FP32 = 3840 cores x 2 (FMA) x 1.703 GHz = 13.08 TFLOP/s (highest-TGP variant)"
        ),
    ),
    DeviceKind(
        name="a100-40gb",
        short="a100-",
        peak_flops=_gpu_peak(6912, 1.41e9),  # 19.49 TFLOP/s
        memory_bandwidth=1555e9,
        memory_bytes=40 * GiB,
        efficiency=0.5,
        overhead_s=8e-6,
        source=(
            "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40 GB): 19.5 TFLOPS FP32, "
            "40 GB HBM2 at 1555 GB/s. FP32 = 6912 cores x 2 (FMA) x 1.41 GHz = 19.49 TFLOP/s "
            "(TF32 Tensor Cores not assumed)"
        ),
    ),
    DeviceKind(
        name="h100-sxm",
        short="h100-",
        peak_flops=_gpu_peak(16896, 1.98e9),  # 66.9 TFLOP/s
        memory_bandwidth=3.35e12,
        memory_bytes=80 * GiB,
        efficiency=0.5,
        overhead_s=8e-6,
        source=(
            "NVIDIA H100 Tensor Core GPU datasheet (SXM5 80 GB): 67 TFLOPS FP32, 80 GB HBM3 at "
            "3.35 TB/s. FP32 = 16896 cores x 2 (FMA) x 1.98 GHz = 66.9 TFLOP/s "
            "(TF32 Tensor Cores not assumed)"
        ),
    ),
)

# Static kinds only: "host-cpu" is measured on first use (see host_cpu), never at import.
KINDS: dict[str, DeviceKind] = {k.name: k for k in _KIND_LIST}


def kind_names() -> tuple[str, ...]:
    """Every name ``kind`` accepts, including the lazily measured "host-cpu"."""
    return (*KINDS, HOST_CPU)


def is_known(name: str) -> bool:
    """True if ``kind(name)`` would succeed, without measuring the host."""
    return name in KINDS or name == HOST_CPU


def kind(name: str) -> DeviceKind:
    """The catalog entry for ``name``; "host-cpu" is measured on this machine on first use."""
    if name == HOST_CPU:
        return host_cpu()
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown device kind {name!r}; known kinds: {', '.join(kind_names())} "
            "(add a DeviceKind to asteroid_fx.ir.catalog.KINDS for other hardware)"
        ) from None


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    # Best-of rather than mean: other processes only ever make a run slower, so the minimum is
    # the closest estimate of what the hardware can do.
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def host_cpu_name() -> str:
    """This machine's CPU model as the OS names it (/proc/cpuinfo), else what platform knows."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def _host_memory_bytes() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        raise RuntimeError(
            "cannot read this machine's physical memory (os.sysconf is POSIX-only); "
            "describe the cluster with catalog kinds such as 'laptop-i7' instead of 'host-cpu'"
        ) from None
    # In a container the training process is killed at the cgroup limit, not at physical RAM.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            physical = min(physical, int(text))  # "max" (v2) or a huge number (v1) = no limit
    return physical


@functools.cache
def host_cpu() -> DeviceKind:
    """This machine's CPU as a DeviceKind, measured once per process (``measure_host_cpu``). Two
    processes measure different figures; a Cluster carries the ones it was made with
    (``Cluster.measured``, in its JSON), so the processes of one run plan with one set."""
    return measure_host_cpu()


def is_measured(name: str) -> bool:
    """Whether kind ``name`` is measured on the machine that names it ("host-cpu"), not a spec sheet."""
    return name == HOST_CPU


def measure_host_cpu() -> DeviceKind:
    """Measure this machine's CPU as a DeviceKind (takes well under a second).

    peak_flops is the best rate of a 512x512 float32 matmul with torch's current thread count:
    the throughput PyTorch's own GEMM gets here, not a theoretical peak. memory_bandwidth is the
    best rate of copying a 64 MiB tensor (read + write counted). overhead_s is the best per-call
    time of a 1-element add, i.e. PyTorch's dispatch cost on this CPU.
    """
    import torch  # deferred: the static catalog is usable without paying torch's import time

    n = 512
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    per_repeat = 4  # several calls per timing so timer granularity and jitter are amortised

    def mm() -> None:
        for _ in range(per_repeat):
            torch.matmul(a, b, out=c)

    mm()  # warm-up: thread pool start-up and kernel selection happen on the first call
    gemm_flops = per_repeat * 2 * n**3 / _best_seconds(mm, 5)

    numel = 64 * MiB // 4
    src = torch.ones(numel)  # ones, not empty: pages must be touched before timing
    dst = torch.zeros(numel)
    dst.copy_(src)
    bandwidth = 2 * src.numel() * src.element_size() / _best_seconds(lambda: dst.copy_(src), 5)

    x, y, z = torch.ones(1), torch.ones(1), torch.empty(1)
    calls = 200

    def tiny() -> None:
        for _ in range(calls):
            torch.add(x, y, out=z)

    tiny()
    overhead = _best_seconds(tiny, 3) / calls

    return DeviceKind(
        name=HOST_CPU,
        short="host",
        peak_flops=gemm_flops,
        memory_bandwidth=bandwidth,
        memory_bytes=_host_memory_bytes(),
        # peak_flops is already an achieved GEMM rate, so only the gap between a well-shaped
        # 512^3 GEMM and a whole training step (small layers, convolutions, backward) remains.
        efficiency=0.7,
        overhead_s=overhead,
        source="measured on this machine",
    )


# ----------------------------------------------------------------------------------------------
# Links and cluster presets


@dataclasses.dataclass(frozen=True)
class LinkKind:
    name: str
    bandwidth: float  # bytes/s, per direction
    latency: float  # one-way seconds
    source: str


_LINK_LIST = (
    LinkKind(
        "gigabit-ethernet",
        bandwidth=125e6,  # 1 Gbit/s
        latency=0.5e-3,
        source=(
            "IEEE 802.3ab 1000BASE-T: 1 Gbit/s line rate (= 125e6 B/s); the Ethernet port of "
            "every Jetson module above. 0.5 ms one-way: typical switched LAN incl. the TCP stack "
            "of an ARM SoC"
        ),
    ),
    LinkKind(
        "wifi-300m",
        bandwidth=37.5e6,  # 300 Mbit/s
        latency=2e-3,
        source=(
            "IEEE 802.11n, 2 spatial streams, 40 MHz, short GI: 300 Mbit/s max PHY rate "
            "(= 37.5e6 B/s); 2 ms one-way: typical single-hop Wi-Fi with contention"
        ),
    ),
    LinkKind(
        "fast-ethernet",
        bandwidth=12.5e6,  # 100 Mbit/s
        latency=1e-3,
        source=(
            "IEEE 802.3u 100BASE-TX: 100 Mbit/s line rate (= 12.5e6 B/s), also the order of a "
            "constrained edge uplink; 1 ms one-way latency"
        ),
    ),
    LinkKind(
        "loopback-10g",
        bandwidth=1.25e9,  # 10 Gbit/s
        latency=20e-6,
        source=(
            "processes on one host talking over TCP loopback / shared memory: modelled as "
            "10 Gbit/s (= 1.25e9 B/s) with 20 us one-way latency"
        ),
    ),
)

LINKS: dict[str, LinkKind] = {link.name: link for link in _LINK_LIST}


def _preset(
    name: str, kinds: tuple[str, ...], link: str, doc: str
) -> Callable[[], "Cluster"]:
    def build() -> "Cluster":
        from asteroid_fx.ir.cluster import Cluster

        spec = LINKS[link]
        return Cluster.from_kinds(kinds, spec.bandwidth, spec.latency, name=name)

    build.__name__ = f"preset_{name.replace('-', '_')}"
    build.__doc__ = f"{doc} Links: {link} ({LINKS[link].source})."
    return build


PRESETS: dict[str, Callable[[], "Cluster"]] = {
    "edge-4-1g": _preset(
        "edge-4-1g",
        ("jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano"),
        "gigabit-ethernet",
        "Four Jetson generations on a gigabit switch.",
    ),
    "edge-6-300m": _preset(
        "edge-6-300m",
        (
            "jetson-nano", "jetson-nano", "jetson-tx2",
            "jetson-xavier-nx", "jetson-orin-nano", "jetson-agx-orin",
        ),
        "wifi-300m",
        "Six Jetsons sharing 802.11n Wi-Fi.",
    ),
    "edge-8-100m": _preset(
        "edge-8-100m",
        (
            "jetson-nano", "jetson-nano", "jetson-tx2", "jetson-tx2",
            "jetson-xavier-nx", "jetson-xavier-nx", "jetson-orin-nano", "raspberry-pi-5",
        ),
        "fast-ethernet",
        "Eight edge boards, including a Raspberry Pi 5, on 100 Mbit/s links.",
    ),
    "edge-5-mixed-1g": _preset(
        "edge-5-mixed-1g",
        ("jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano", "laptop-i7"),
        "gigabit-ethernet",
        "Four Jetsons and a laptop CPU on a gigabit switch.",
    ),
    "edge-4-pi-1g": _preset(
        "edge-4-pi-1g",
        ("raspberry-pi-5", "raspberry-pi-5", "raspberry-pi-5", "jetson-nano"),
        "gigabit-ethernet",
        "Three Raspberry Pi 5 boards and a Jetson Nano on a gigabit switch (the demo's cluster).",
    ),
    "edge-6-laptop-300m": _preset(
        "edge-6-laptop-300m",
        ("jetson-nano", "jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano", "laptop-i7"),
        "wifi-300m",
        "Five Jetsons and a laptop CPU sharing 802.11n Wi-Fi (a lab bench or a home).",
    ),
    "edge-7-laptop-100m": _preset(
        "edge-7-laptop-100m",
        (
            "jetson-nano", "jetson-tx2", "jetson-tx2", "jetson-xavier-nx",
            "jetson-orin-nano", "jetson-agx-orin", "laptop-i7",
        ),
        "fast-ethernet",
        "Six Jetsons from Nano to AGX Orin and a laptop CPU on 100 Mbit/s links.",
    ),
    # Emulated clusters: N training processes on this machine. Each is modelled as the host CPU
    # measured with torch's thread count at first use; processes that share the cores run
    # slower than that, so give each process fewer threads or read predictions as optimistic.
    **{
        f"host-{n}": _preset(f"host-{n}", (HOST_CPU,) * n, "loopback-10g",
                             f"{n} copies of this machine's CPU.")
        for n in (2, 3, 4)
    },
}


def preset(name: str) -> "Cluster":
    """A fresh Cluster for the preset ``name`` (see PRESETS)."""
    try:
        build = PRESETS[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown cluster preset {name!r}; presets: {', '.join(PRESETS)}"
        ) from None
    return build()

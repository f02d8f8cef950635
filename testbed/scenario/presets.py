"""Device and link presets by name: real devices and networks with published figures (pure).

Owns `DEVICES` (peak FLOP/s, memory bandwidth and memory size of a device a scenario may
name with `devices[].preset`) and `LINKS` (rate and latency of a network a link may name
with `preset`), each number with where it comes from. A scenario's own keys override a
preset's values. docs/devices.md lists them (generated from this table and checked by
tests/test_presets.py). Pure data: no asyncio, no torch, no IO.

How the numbers are made, so that each can be checked by hand:
- peak FLOP/s is the vendor's figure when it publishes one (Apple, NVIDIA); otherwise cores
  x clock x FP32 FLOPs per cycle per core (two 128-bit FMA pipes: 16 on Cortex-A72/A76);
- memory bandwidth is the vendor's figure, or transfer rate x bus width of the memory the
  vendor names (e.g. LPDDR4X-4267 on a 32-bit bus: 4267e6 x 4 B = 17.1 GB/s). Peak
  bandwidth is an upper bound: what a program streams is typically 60 to 85 % of it;
- link rates are what a TCP stream gets in practice (not the PHY rate), latencies one way.
The figures were taken from the documents named, from memory, without re-checking them
online in this change (the machine it was written on had no network).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePreset:
    name: str
    description: str
    compute_gflops: float  # peak FP32 (FP16 where the vendor quotes that for the GPU), GFLOP/s
    memory_bandwidth_gbps: float  # peak, GB/s (10^9 bytes/s)
    memory_mib: float  # the memory of the variant named in `description`
    compute_source: str
    bandwidth_source: str
    memory_source: str


@dataclass(frozen=True)
class LinkPreset:
    name: str
    description: str
    bandwidth_mbps: float  # what a TCP stream gets in practice, Mbit/s
    latency_ms: float  # one way
    rate_source: str
    latency_source: str


_GIB = 1024.0  # MiB per GiB

DEVICES: dict[str, DevicePreset] = {p.name: p for p in (
    DevicePreset(
        "raspberry-pi-4", "Raspberry Pi 4 Model B, 8 GB (BCM2711, 4 x Cortex-A72 at 1.5 GHz, LPDDR4-3200)",
        96.0, 12.8, 8 * _GIB,
        "4 cores x 1.5 GHz x 16 FP32 FLOP/cycle (Raspberry Pi 4 product brief, Raspberry Pi Ltd, 2019; "
        "Arm Cortex-A72 Software Optimization Guide, Arm, 2015: two 128-bit FP/ASIMD pipes with FMA)",
        "LPDDR4-3200 x 32-bit bus = 12.8 GB/s (Raspberry Pi 4 product brief, 2019)",
        "Raspberry Pi 4 product brief (2019): 1, 2, 4 or 8 GB"),
    DevicePreset(
        "raspberry-pi-5", "Raspberry Pi 5, 8 GB (BCM2712, 4 x Cortex-A76 at 2.4 GHz, LPDDR4X-4267)",
        153.6, 17.1, 8 * _GIB,
        "4 cores x 2.4 GHz x 16 FP32 FLOP/cycle (Raspberry Pi 5 product brief, Raspberry Pi Ltd, 2023; "
        "Arm Cortex-A76 Software Optimization Guide, Arm, 2018: two 128-bit ASIMD pipes with FMA)",
        "LPDDR4X-4267 x 32-bit bus = 17.1 GB/s (Raspberry Pi 5 product brief, 2023)",
        "Raspberry Pi 5 product brief (2023): 4 or 8 GB"),
    DevicePreset(
        "jetson-orin-nano-8gb", "NVIDIA Jetson Orin Nano 8 GB module (1024-core Ampere GPU at 625 MHz)",
        1280.0, 68.0, 8 * _GIB,
        "1024 CUDA cores x 2 x 625 MHz = 1.28 TFLOP/s FP32 (Jetson Orin Nano Series data sheet, NVIDIA, 2023)",
        "68 GB/s, 128-bit LPDDR5 (Jetson Orin Nano Series data sheet, NVIDIA, 2023)",
        "8 GB LPDDR5 (Jetson Orin Nano Series data sheet, NVIDIA, 2023)"),
    DevicePreset(
        "jetson-agx-orin-64gb", "NVIDIA Jetson AGX Orin 64 GB module (2048-core Ampere GPU at 1.3 GHz)",
        5325.0, 204.8, 64 * _GIB,
        "2048 CUDA cores x 2 x 1.3 GHz = 5.3 TFLOP/s FP32 (Jetson AGX Orin Series data sheet, NVIDIA, 2022)",
        "204.8 GB/s, 256-bit LPDDR5 (Jetson AGX Orin Series data sheet, NVIDIA, 2022)",
        "64 GB LPDDR5 (Jetson AGX Orin Series data sheet, NVIDIA, 2022)"),
    DevicePreset(
        "snapdragon-8-gen-2", "Qualcomm Snapdragon 8 Gen 2 phone, 12 GB (Adreno 740 GPU, LPDDR5X-8400)",
        3400.0, 67.2, 12 * _GIB,
        "Adreno 740 about 3.4 TFLOP/s FP32 (third-party GPU tables compiled from Qualcomm figures, "
        "2022; Qualcomm publishes no FLOP figure)",
        "LPDDR5X at 4200 MHz (8400 MT/s) x 64-bit bus = 67.2 GB/s (Snapdragon 8 Gen 2 product brief, Qualcomm, 2022)",
        "12 GB: a common configuration of 2023 phones with this SoC (e.g. Samsung Galaxy S23 Ultra spec sheet, 2023)"),
    DevicePreset(
        "macbook-air-m2", "Apple MacBook Air (2022), M2 with 10-core GPU, 24 GB",
        3600.0, 100.0, 24 * _GIB,
        "3.6 TFLOP/s GPU (Apple M2 press release, Apple, June 2022)",
        "100 GB/s unified memory (Apple M2 press release, Apple, June 2022)",
        "up to 24 GB (Apple M2 press release, June 2022)"),
    DevicePreset(
        "macbook-pro-m1-pro", "Apple MacBook Pro 14 (2021), M1 Pro with 16-core GPU, 16 GB",
        5200.0, 200.0, 16 * _GIB,
        "5.2 TFLOP/s GPU (Apple M1 Pro and M1 Max press release, Apple, October 2021)",
        "200 GB/s unified memory (same press release)",
        "16 or 32 GB (same press release)"),
    DevicePreset(
        "macbook-pro-m1-max", "Apple MacBook Pro 16 (2021), M1 Max with 32-core GPU, 64 GB",
        10400.0, 400.0, 64 * _GIB,
        "10.4 TFLOP/s GPU (Apple M1 Pro and M1 Max press release, Apple, October 2021)",
        "400 GB/s unified memory (same press release)",
        "32 or 64 GB (same press release)"),
    DevicePreset(
        "mac-studio-m2-ultra", "Apple Mac Studio (2023), M2 Ultra with 76-core GPU, 192 GB: a small server",
        27200.0, 800.0, 192 * _GIB,
        "27.2 TFLOP/s GPU (Apple M2 Ultra press release, Apple, June 2023)",
        "800 GB/s unified memory (same press release)",
        "up to 192 GB (same press release)"),
)}

LINKS: dict[str, LinkPreset] = {p.name: p for p in (
    LinkPreset(
        "wifi-4", "802.11n, 2.4 GHz, 2 x 2, 20 MHz", 70.0, 3.0,
        "PHY 144.4 Mbit/s (IEEE 802.11n-2009, MCS 15, short guard interval); a TCP stream gets about half "
        "(MAC overhead and contention, the usual rule for Wi-Fi)",
        "a few ms one way on an idle home network (typical ping round trips of 3 to 10 ms)"),
    LinkPreset(
        "wifi-5", "802.11ac, 5 GHz, 2 x 2, 80 MHz", 400.0, 2.0,
        "PHY 866.7 Mbit/s (IEEE 802.11ac-2013, MCS 9, short guard interval); a TCP stream gets about half",
        "typical ping round trips of 2 to 6 ms on an idle network"),
    LinkPreset(
        "wifi-6", "802.11ax, 5 GHz, 2 x 2, 80 MHz", 600.0, 2.0,
        "PHY 1201 Mbit/s (IEEE 802.11ax-2021, MCS 11); a TCP stream gets about half",
        "typical ping round trips of 2 to 6 ms on an idle network"),
    LinkPreset(
        "gigabit-ethernet", "1000BASE-T through one switch", 941.0, 0.1,
        "TCP goodput at MTU 1500: 1000 Mbit/s x 1448 / 1538 = 941 Mbit/s (IEEE 802.3ab framing; "
        "what iperf reports on a clean gigabit link)",
        "round trips of about 0.2 ms through one switch"),
    LinkPreset(
        "5g", "5G (sub-6 GHz), device to device through the network", 20.0, 25.0,
        "median 5G upload about 20 Mbit/s (Opensignal and Ookla Speedtest 5G reports, 2023); a device-to-device "
        "stream is bounded by the sender's upload (downloads are about 10 times faster)",
        "median 5G latency about 25 ms round trip to a nearby server (same reports); one way device to device "
        "crosses two radio legs, about one such round trip"),
    LinkPreset(
        "lte", "4G LTE, device to device through the network", 8.0, 40.0,
        "median LTE upload about 8 Mbit/s (Opensignal and Ookla Speedtest mobile reports, 2023)",
        "median LTE latency about 40 ms round trip (same reports); one way device to device about one round trip"),
)}


def device_preset(name: str) -> DevicePreset:
    try:
        return DEVICES[name]
    except KeyError:
        raise KeyError(f"unknown device preset {name!r}; known: {', '.join(DEVICES)}") from None

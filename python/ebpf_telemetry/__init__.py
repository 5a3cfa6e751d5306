"""ebpf-telemetry: eBPF node telemetry for Prometheus."""

__version__ = "0.1.0"

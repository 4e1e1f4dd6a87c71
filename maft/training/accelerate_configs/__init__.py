"""Accelerate configuration files for `accelerate launch --config_file ...` (see docs/distributed.md)."""

from pathlib import Path


# DDP on one node or several: num_processes, num_machines, machine_rank, main_process_ip/port set on the command line
MULTI_GPU_CONFIG = Path(__file__).with_name("multi_gpu.yaml")


__all__ = ["MULTI_GPU_CONFIG"]

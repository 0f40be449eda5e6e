"""A free TCP port per DeepSpeed launch.

DeepSpeed's CPU shared-memory allreduce names its /dev/shm segments after MASTER_ADDR and MASTER_PORT,
so two launches on one port (sequential ones after a killed run, or concurrent ones) can meet stale
or foreign segments. Each launch in the tests gets its own port.
"""

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

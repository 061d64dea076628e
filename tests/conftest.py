import socket

import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test touches a network: hub access off, and sockets to anything but loopback fail."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            raise OSError(f"network access in a test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def tiny_sd1():
    from lora_sd.tiny import build_tiny_sd

    return build_tiny_sd("sd1")


@pytest.fixture(scope="session")
def tiny_sd2():
    from lora_sd.tiny import build_tiny_sd

    return build_tiny_sd("sd2")


@pytest.fixture(params=["sd1", "sd2"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def pytest_configure(config):
    """Tiny models gain nothing from threads, and 2 OpenMP threads on 2 busy cores run up to 10x slower."""
    import torch

    torch.set_num_threads(1)

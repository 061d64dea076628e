import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

# Every cache a test may fill lives in one temporary folder, HOME included, so that no test writes the
# user's ~/.cache. Set at import, before any test module imports `datasets` (which reads its cache path then).
SANDBOX = Path(tempfile.mkdtemp(prefix="lora_sd-tests-"))
for _var, _sub in {"HOME": "home", "XDG_CACHE_HOME": "xdg-cache", "HF_HOME": "hf", "HF_DATASETS_CACHE": "hf/datasets",
                   "LORA_SD_CACHE": "lora_sd-cache"}.items():
    os.environ[_var] = str(SANDBOX / _sub)
(SANDBOX / "home").mkdir()


@pytest.fixture(autouse=True)
def _no_home_cache():
    """Fails the test that wrote into ~/.cache (HOME is the sandbox's: anything there bypassed the cache variables)."""
    yield
    written = SANDBOX / "home" / ".cache"
    if written.exists():
        found = sorted(str(p.relative_to(written)) for p in written.rglob("*"))[:5]
        shutil.rmtree(written)
        pytest.fail(f"the test wrote into ~/.cache: {found}")


def pytest_unconfigure(config):
    shutil.rmtree(SANDBOX, ignore_errors=True)


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

"""The CUDA stream and event API faked for a CPU machine (conftest.py's ``fake_cuda`` fixture): block swapping's
CUDA code path then runs on the CPU, and the order of what it waits on and records can be checked."""

import contextlib

import torch


class FakeEvent:
    """Records nothing on a device; each is a distinct object, and it remembers the stream it was recorded on."""

    stream = None

    def record(self, stream=None):
        self.stream = stream


class FakeStream:
    """Its ``wait_event`` calls go to a log shared by all streams, so that their order can be checked."""

    def __init__(self, log):
        self.log = log

    def wait_event(self, event):
        self.log.append(("wait", self, event))


class FakeCuda:
    def __init__(self):
        self.log = []
        self.current = FakeStream(self.log)  # what torch.cuda.current_stream returns

    def current_waits(self):
        return [event for what, stream, event in (e for e in self.log if e[0] == "wait") if stream is self.current]


def install_fake_cuda(monkeypatch) -> FakeCuda:
    """torch.cuda's streams and events replaced by the fakes above (conftest.py's ``fake_cuda`` fixture)."""
    cuda = FakeCuda()
    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: FakeStream(cuda.log))
    monkeypatch.setattr(torch.cuda, "Event", lambda *args, **kwargs: FakeEvent())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args, **kwargs: cuda.current)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return cuda

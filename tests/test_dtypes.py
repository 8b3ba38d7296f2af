"""Command-line names of dtypes and devices: what they stand for, and one-line errors naming the flag."""

import pytest
import torch

from library.dtypes import device_from_name, dtype_from_name, preferred_device
from library.errors import UserError


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("Float", torch.float32), (" fp16", torch.float16)])
def test_dtype_names(name, dtype):
    assert dtype_from_name(name, "--precision") is dtype


def test_an_unknown_dtype_name_lists_the_known_ones():
    with pytest.raises(UserError, match=r"^--save_precision fp4: expected one of float, fp32, "):
        dtype_from_name("fp4", "--save_precision")


def test_cpu_names_are_devices():
    assert device_from_name("cpu", "--device") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", ""])
def test_a_malformed_device_name_is_named(name):
    with pytest.raises(UserError, match=rf"^--working_device {name}: not a device name \(e\.g\. cpu, cuda, cuda:1\)$"):
        device_from_name(name, "--working_device")


@pytest.mark.parametrize("name", ["meta", "meta:0"])
def test_the_meta_device_is_refused_naming_the_flag(name):
    """It passed the check, and the merge then crashed with "Cannot copy out of meta tensor"."""
    with pytest.raises(UserError, match=rf"^--working_device {name}: the meta device holds no data; give a device "
                                        r"to compute on \(cpu, cuda\)$"):  # fmt: skip
        device_from_name(name, "--working_device")


def test_a_device_this_machine_lacks_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^--device cuda: this machine \(or its torch build\) has no cuda device$"):
        device_from_name("cuda", "--device")


def test_a_device_index_beyond_the_count_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_from_name("cuda:1", "--device") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"^--device cuda:2: there are only 2 cuda devices$"):
        device_from_name("cuda:2", "--device")


@pytest.mark.parametrize(
    ("available", "device"),
    [({"cuda", "xpu", "mps"}, "cuda"), ({"xpu", "mps"}, "xpu"), ({"mps"}, "mps"), (set(), "cpu")],
)
def test_the_preferred_device_is_cuda_then_xpu_then_mps(monkeypatch, available, device):
    """As sd-scripts' get_preferred_device: a Mac or an Intel GPU was passed over for the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: "cuda" in available)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: "xpu" in available)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: "mps" in available)
    assert preferred_device() == device


def test_full_fp16_gradients_are_unscaled_and_stepped():
    """--full_fp16 trains an fp16 LoRA: accelerate's GradScaler (made for fp16 on a GPU; a CPU one here)
    refuses to unscale fp16 gradients unless the trainer allows them."""
    from library.dtypes import allow_fp16_gradients

    def step(allow: bool) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
        optimizer = torch.optim.SGD([weight], lr=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        if allow:
            allow_fp16_gradients(scaler)
        scaler.scale((weight.float() * torch.arange(4.0)).sum()).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        return weight.detach()

    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        step(allow=False)
    torch.testing.assert_close(step(allow=True), torch.tensor([1.0, 0.5, 0.0, -0.5], dtype=torch.float16))

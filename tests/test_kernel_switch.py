"""zigzag.kernels.switch: one switch per optional kernel, chosen in code or by its environment variable."""

from __future__ import annotations

import pytest
import torch

from zigzag import kernels
from zigzag.kernels.switch import KernelSwitch

KERNELS = {
    "ea": "ZIGZAG_EA_BACKEND",
    "mass": "ZIGZAG_MASS_BACKEND",
    "moments": "ZIGZAG_MOMENTS_BACKEND",
    "gather": "ZIGZAG_GATHER_BACKEND",
    "merge": "ZIGZAG_MERGE_BACKEND",
    "varlen": "ZIGZAG_VARLEN_BACKEND",
}


def test_every_kernel_has_one_switch_named_by_its_environment_variable():
    assert {name: switch.env for name, switch in kernels.SWITCHES.items()} == KERNELS
    with pytest.raises(ValueError, match="unknown kernel 'flash'"):
        kernels.set_backend("flash", "torch")


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_set_backend_and_using(kernel):
    before = kernels.get_backend(kernel)
    with kernels.using(kernel, "torch"):
        assert kernels.get_backend(kernel) == "torch"
        assert not kernels.kernel_switch(kernel).use_kernel(torch.device("cpu"), True)
        with pytest.raises(ValueError, match=f"unknown {kernel} backend 'cuda'"):
            kernels.set_backend(kernel, "cuda")
    assert kernels.get_backend(kernel) == before


def test_environment_variable_sets_the_first_choice(monkeypatch):
    monkeypatch.setenv("ZIGZAG_VARLEN_BACKEND", "segment")  # the old name of varlen's reference
    assert KernelSwitch("varlen", "ZIGZAG_VARLEN_BACKEND", aliases={"segment": "torch"}).name == "torch"
    monkeypatch.setenv("ZIGZAG_EA_BACKEND", "flex")
    switch = KernelSwitch("ea", "ZIGZAG_EA_BACKEND")  # a bad value is reported on first use, by name
    with pytest.raises(ValueError, match="ZIGZAG_EA_BACKEND must be one of auto, torch, triton; got 'flex'"):
        switch.use_kernel(torch.device("cpu"), True)


def test_auto_picks_the_kernel_for_supported_cuda_tensors_only(monkeypatch):
    switch = KernelSwitch("ea", "ZIGZAG_UNSET_BACKEND")
    assert switch.name == "auto"
    assert not switch.use_kernel(torch.device("cpu"), True)  # even under the interpreter
    monkeypatch.setattr("zigzag.kernels.switch.triton_runs_on", lambda device: True)
    assert switch.use_kernel(torch.device("cuda"), True)
    assert not switch.use_kernel(torch.device("cuda"), False)
    switch.set("triton")
    assert switch.use_kernel(torch.device("cuda"), False)  # "triton": the launcher rejects what it cannot take
    monkeypatch.setattr("zigzag.kernels.switch.triton_runs_on", lambda device: False)
    with pytest.raises(RuntimeError, match="'triton' ea backend needs CUDA tensors"):
        switch.use_kernel(torch.device("cpu"), True)

"""Kernels run on q's GPU: Triton launches on the current CUDA device and its current stream, so a
call whose tensors sit on another GPU than the current one switches to theirs for its launches
(runtime.call.on_device), at every generated entry point that launches kernels. No second GPU
here: the switch is checked with a stand-in tensor, the wiring by recording what each entry point
switches to (the results unchanged)."""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from attncc.runtime import call as call_mod
from cases import module

launch = importlib.import_module("attncc.runtime.launch")  # (the package's `launch` is a function)


class OnGpu:
    is_cuda = True

    def __init__(self, index):
        self.index = index

    def get_device(self):
        return self.index


@pytest.mark.parametrize("current, index, switches", [(0, 1, True), (1, 0, True), (0, 0, False), (3, 3, False)])
def test_on_device_switches_only_to_another_gpu(monkeypatch, current, index, switches):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext(entered.append(i)))
    with call_mod.on_device(OnGpu(index)):
        pass
    assert entered == ([index] if switches else [])


@pytest.mark.parametrize("t", [torch.zeros(2), object(), None, 3])
def test_no_switch_off_the_gpu(monkeypatch, t):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("asked the current device"))
    assert call_mod.on_device(t) is call_mod._SAME_DEVICE


def _record(monkeypatch):
    seen = []
    real, real_call = call_mod.on_device, call_mod.on_call_device

    def recording(t):
        seen.append(t)
        return real(t)

    def recording_call(call):
        seen.append(call.q)
        return real_call(call)
    monkeypatch.setattr(call_mod, "on_device", recording)
    monkeypatch.setattr(launch, "on_call_device", recording_call)
    return seen


@pytest.mark.parametrize("current, index, switches", [(0, 1, True), (0, 0, False)])
def test_on_call_device_keeps_the_index_with_the_signature(monkeypatch, current, index, switches):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext(entered.append(i)))
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    call = call_mod.bind(module("causal").SPEC, q, k, v)
    call.memo["cuda_index"] = index  # as a call on GPU `index` keeps it
    with call_mod.on_call_device(call):
        pass
    assert entered == ([index] if switches else [])
    call.memo.pop("cuda_index")
    assert call_mod.on_call_device(call) is call_mod._SAME_DEVICE  # a CPU call: -1, no switch


def test_every_entry_point_switches_to_q_device(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=gen) for _ in range(3))
    causal, linear, dropout = module("causal"), module("linear_elu"), module("causal_dropout")
    want = causal.attention(q, k, v)
    want_decode = causal.decode(q[:, :, :1], k, v, kv_len=[7])
    seen = _record(monkeypatch)
    assert torch.equal(causal.attention(q, k, v), want) and seen[-1] is q
    assert torch.equal(causal.decode(q[:, :, :1], k, v, kv_len=[7]), want_decode) and seen[-1].shape[2] == 1
    linear.attention(q, k, v)
    assert seen[-1] is q
    qs = q[:, :, :1]
    linear.step(qs, k[:, :, :1], v[:, :, :1], None, position=0, n=12)
    assert seen[-1] is qs
    dropout.dropout_keep_mask(q, k, v, seed=1, dropout_p=0.5)
    assert seen[-1] is q and len(seen) == 5

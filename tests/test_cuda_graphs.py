"""ilvr.cuda_graphs on any machine: the gate's locking rules and the capture-failure fallback.

The graph replay itself needs a GPU and is tested in test_cuda.py.
"""
import threading

import pytest
import torch

from ilvr import bench
from ilvr.runtime.cuda_graphs import GpuGate, GraphedPredict
from ilvr.network import UNetConfig
from ilvr.schedule import DiffusionConfig


def _enter(ctx, inside: threading.Event, leave: threading.Event) -> threading.Thread:
    def run():
        with ctx:
            inside.set()
            leave.wait(5)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_readers_share_and_a_capture_has_the_gpu_alone():
    gate = GpuGate()
    r1_in, r1_go, r2_in, r2_go = (threading.Event() for _ in range(4))
    readers = [_enter(gate.work(), r1_in, r1_go), _enter(gate.work(), r2_in, r2_go)]
    assert r1_in.wait(2) and r2_in.wait(2)  # two runs work at once

    c_in, c_go = threading.Event(), threading.Event()
    capture = _enter(gate.capture(), c_in, c_go)
    assert not c_in.wait(0.2)  # waits for the readers
    late_in, late_go = threading.Event(), threading.Event()
    late = _enter(gate.work(), late_in, late_go)
    r1_go.set()
    assert not c_in.wait(0.2)  # one reader is still inside
    r2_go.set()
    assert c_in.wait(2)
    assert not late_in.wait(0.2)  # a reader that came while the capture waited stays out until it is done
    c_go.set()
    assert late_in.wait(2)
    late_go.set()
    for t in (*readers, capture, late):
        t.join(2)


def test_captures_queue_one_after_the_other():
    gate = GpuGate()
    first_in, first_go, second_in, second_go = (threading.Event() for _ in range(4))
    first = _enter(gate.capture(), first_in, first_go)
    assert first_in.wait(2)
    second = _enter(gate.capture(), second_in, second_go)
    assert not second_in.wait(0.2)
    first_go.set()
    assert second_in.wait(2)
    second_go.set()
    first.join(2), second.join(2)


def test_gate_is_released_when_the_work_raises():
    gate = GpuGate()
    with pytest.raises(ValueError):
        with gate.work():
            raise ValueError("boom")
    done = threading.Event()
    thread = threading.Thread(target=lambda: (gate.capture().__enter__(), done.set()), daemon=True)
    thread.start()
    assert done.wait(2)


def test_a_failed_capture_runs_that_sample_eagerly_and_three_in_a_row_turn_graphs_off(monkeypatch):
    tiny = UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(), num_head_channels=32)
    model = bench.random_model(tiny, DiffusionConfig(), seed=0)
    x, t = torch.randn(1, 3, 16, 16), torch.full((1,), 10)

    def refuse(self, x, t):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedPredict, "_capture", refuse)
    with torch.inference_mode():
        expected = model.predict(x, t)
        for attempt in (1, 2, 3):
            predict = GraphedPredict(model)
            with pytest.warns(RuntimeWarning, match=f"{attempt} failure"):
                torch.testing.assert_close(predict(x, t), expected)
            torch.testing.assert_close(predict(x, t), expected)  # the rest of the run: eager, no new try
            assert model.cuda_graphs is (attempt < 3)
    assert model.failed_captures == 3

"""A/B, 2026-11-26: onnxruntime threads busy-waiting between UNet calls (allow_spinning 1, its default) or not (0, ilvr.onnx_cpu).
Run: OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/2026-11-26/onnxruntime_spinning_ab.py"""
import time, torch, sys

from ilvr.loading import load_model
from ilvr.sampler import sample
from ilvr.bench import synthetic_reference
ref = synthetic_reference(64, 3, 0)
models = {}

for spin in ("0", "1"):
    import onnxruntime as ort
    real_add = ort.SessionOptions.add_session_config_entry
    def patched(self, k, v, spin=spin):
        return real_add(self, k, spin if k == "session.intra_op.allow_spinning" else v)
    ort.SessionOptions.add_session_config_entry = patched
    models[spin] = load_model("emoji64")
    ort.SessionOptions.add_session_config_entry = real_add
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for spin, m in models.items():
        t0 = time.time(); c0 = time.process_time(); sample(m, ref, seeds=[0], n_factor=8, steps=250)
        print(f"spin={spin}: {time.time()-t0:.2f} s wall, {time.process_time()-c0:.2f} s cpu", flush=True)

"""The GPU checks of .ci/gpu_check as a plain script, for machines without nbdev: drives the exported library.

    python .ci/gpu_check.py RESULTS_DIR [--cpu]

Checks (each prints PASS/FAIL; exit status 1 if any failed), mirroring the notebooks' `#| cuda` cells:
  - a CIFAR-preset CORAL training step with each speed switch makes no host-device sync
    (torch.cuda.set_sync_debug_mode('error')), and its loss is finite;
  - under torch.compile (Inductor) CORAL's bottleneck hook captures the same features as eager;
  - bf16 + inference-mode sample grids match fp32 ones up to bf16 rounding;
  - the U-Net's attention runs through scaled_dot_product_attention.
--cpu rehearses the same code on a CPU with the digits preset (no sync check there). Results: gpu_check_py.json.
"""
import json, math, sys, tempfile, time, traceback
from pathlib import Path

import torch

from coral_nb.data import ImageBank
from coral_nb.train import Trainer, preset
from coral_nb.ddpm import Diffusion, sample_grid
from coral_nb.unet import BottleneckHook
from coral_nb.bench import uses_sdpa, make_trainer, _discard

out = Path(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith('--') else '.')
cpu = '--cpu' in sys.argv or not torch.cuda.is_available()
dev = 'cpu' if cpu else 'cuda'
name, size, bs = ('digits_coral', 8, 16) if cpu else ('cifar10_lt_0.01_coral', 32, 64)
results = {}

def check(label):
    def deco(fn):
        t0 = time.time()
        try: fn(); results[label] = 'PASS'
        except Exception: results[label] = 'FAIL: ' + traceback.format_exc(limit=3)
        print(f"{results[label].splitlines()[0]:5.5} {label} ({time.time() - t0:.0f} s)", flush=True)
        if results[label] != 'PASS': print(results[label], flush=True)
    return deco

def trainer(**switches):
    "bench.make_trainer on its synthetic data; every check lets go of it with bench._discard."
    return make_trainer(preset(name, batch_size=bs, sample_every=0, **switches), dev)

for sw in (dict(), dict(channels_last=True), dict(fused_optimizer=True), dict(tf32=True, bf16=False),
           dict(compile=True, channels_last=True, fused_optimizer=True, tf32=True)):
    if cpu and sw.get('compile'): continue   # compiling on a small CPU takes minutes
    @check(f"no host-device sync in the step with {sw or 'the defaults'}")
    def _():
        t = trainer(**sw)
        for _ in range(3): t.train_step()
        if not cpu: torch.cuda.set_sync_debug_mode('error')
        try:
            for _ in range(3): parts = t.train_step()
        finally:
            if not cpu: torch.cuda.set_sync_debug_mode(0)
        assert math.isfinite(parts['loss'].item())
        _discard(t)

@check("the bottleneck hook under torch.compile (Inductor)" + (' [skipped on a CPU]' if cpu else ''))
def _():
    if cpu: return
    t = trainer(compile=True)
    t.train_step()
    x0, y = t.bank.batch(torch.arange(bs, device=dev))
    tt = torch.randint(0, 1000, (bs,), device=dev)
    with BottleneckHook(t.net) as h: t.net(x0, tt, y)
    with BottleneckHook(t.model) as h0: t.model(x0, tt, y)
    torch.testing.assert_close(h.features, h0.features, atol=2e-3, rtol=2e-3)
    _discard(t)

@check("bf16 + inference-mode sampling agrees with fp32")
def _():
    t = trainer()
    d = Diffusion(1000).to(dev)
    a = sample_grid(t.ema.module, d, range(10), 2, (3, size, size), sampler='ddim', steps=20)
    b = sample_grid(t.ema.module, d, range(10), 2, (3, size, size), sampler='ddim', steps=20, bf16=True, inference=True)
    _discard(t)
    assert b.is_inference() and (a - b).abs().max() < 0.1, (a - b).abs().max()

@check("attention runs through scaled_dot_product_attention")
def _():
    t = trainer()
    try: assert uses_sdpa(t.model)
    finally: _discard(t)

out.mkdir(parents=True, exist_ok=True)
(out / 'gpu_check_py.json').write_text(json.dumps({'device': dev, 'results': results}, indent=1))
sys.exit(0 if all(v == 'PASS' for v in results.values()) else 1)

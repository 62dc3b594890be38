"""The study runs on one GPU, as a plain script over the exported library (no nbdev needed).

    python .ci/gpu_study.py OUT --data DATA.tgz --phase evidence --budget 240 [--toy]
    python .ci/gpu_study.py OUT --data DATA.tgz --phase study [--toy]

DATA.tgz holds the folders of `coral_nb.reproduce.cifar_study_data` (lt/, train/, test/), made where the JPEG copy of
CIFAR-10 is (see .ci/gpu_check). Results: OUT/study/*.json (one record per run, as chapter 08 reads them),
OUT/study/grids/*.png and OUT/gpu_study_<phase>.json (what ran, how long, what failed).

- evidence: CIFAR-10-LT rho=0.01 at 32x32 (scale 'cifar32'), DDPM and CORAL x seeds 0, 1, 2, all six at once on the GPU.
  The number of training steps is set from a timed burst so that the six runs fit `--budget` seconds of training.
- study: the digits study (23 jobs) and CIFAR-10-LT at 16x16 (scale 'cifar16', DDPM and CORAL x 3 seeds), several
  jobs at once.
--toy rehearses the plumbing on a CPU in a minute or two (few steps, few samples); its records are not the study's.
"""
import argparse, json, math, multiprocessing as mp, os, sys, tarfile, time, traceback
from pathlib import Path


def _worker(args):
    "Run one job (or a chain of jobs sharing a run folder) in a fresh process; returns (names, status, seconds)."
    jobs, runs, study, device, toy = args
    import torch
    torch.set_num_threads(1)
    from coral_nb.reproduce import run_study_job
    t0, names = time.time(), [j['name'] for j in jobs]
    try:
        for j in jobs:
            kw = dict(n_per_class=6) if toy else {}
            run_study_job(j, runs, study, device=device, **kw)
        return names, 'ok', round(time.time() - t0, 1)
    except Exception:
        return names, 'FAIL ' + traceback.format_exc(limit=4), round(time.time() - t0, 1)


def _toy(job):
    "A job shrunk for a CPU rehearsal: a few steps, a small U-Net where the scale's is large."
    import dataclasses
    cfg = job['cfg']
    small = dict(steps=min(cfg.steps, 12), warmup=2, ckpt_every=6, log_every=6, batch_size=8)
    if cfg.img_size > 16: small['model'] = 'cifar_ch64'
    return {**job, 'cfg': dataclasses.replace(cfg, **small)}


def prepare(data_tgz:Path, where:Path) -> dict:
    "Unpack the carried folders once."
    if not (where / 'lt').is_dir():
        where.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data_tgz) as t: t.extractall(where)
    return {k: where / k for k in ('lt', 'train', 'test')}


def build_references(data:dict, sizes, device, toy:bool):
    "Train the offline extractors and cache the reference statistics before the workers start (no two build one)."
    from coral_nb.eval import offline_extractor, reference_stats
    out = {}
    for size in sizes:
        t0 = time.time()
        if size == 8: ext = offline_extractor('digits', 8, 3, device=device); reference_stats(ext, 'digits', 8, 3)
        else:
            ext = offline_extractor('folder', size, 3, root=data['train'], device=device, epochs=1 if toy else None)
            reference_stats(ext, 'folder', size, 3, data['train'])
        out[size] = dict(name=ext.name, heldout_accuracy=ext.info.get('heldout_accuracy'), seconds=round(time.time() - t0, 1))
        print(f"extractor {size}px: {out[size]}", flush=True)
    return out


def time_steps(cfg, data, device, n:int=20) -> float:
    "Seconds per training step of `cfg`, alone on the device, after a warm-up."
    import tempfile, torch
    from coral_nb.train import Trainer
    t = Trainer(cfg, tempfile.mkdtemp(), device=device, resume=False, quiet=True)
    try:
        for _ in range(5): t.train_step()
        if device == 'cuda': torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(n): t.train_step()
        if device == 'cuda': torch.cuda.synchronize()
        return (time.time() - t0) / n
    finally: t.close()


def run_pool(jobs, runs, study, device, workers, toy, deadline):
    "Each job (or chain) in its own process, `workers` at a time; stops handing out work at `deadline`."
    ctx, results = mp.get_context('spawn'), []
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        pending = [pool.apply_async(_worker, ((j if isinstance(j, list) else [j], runs, study, device, toy),)) for j in jobs]
        for p in pending:
            left = deadline - time.time()
            try: results.append(p.get(timeout=max(left, 1)))
            except mp.TimeoutError: results.append((['?'], 'TIMEOUT (deadline)', None))
            print(results[-1][:1], results[-1][1].splitlines()[0], results[-1][2], flush=True)
        pool.terminate()
    return results


def grids(study:Path, runs:Path, scale:str, n:int, device):
    "DDPM beside CORAL, seed 0, every class with the rarest first."
    from coral_nb.reproduce import side_by_side, study_grid, tail_first
    rec = study / f'{scale}_ddpm_s0.json'
    if not rec.is_file() or not (runs / f'{scale}_coral_s0').is_dir(): return
    order = tail_first(json.loads(rec.read_text())['provenance']['class_counts'])
    (study / 'grids').mkdir(exist_ok=True)
    side_by_side({f'{m.upper()}, seed 0': study_grid(runs / f'{scale}_{m}_s0', order, n, seed=1, device=device)
                  for m in ('ddpm', 'coral')}).save(study / 'grids' / f'{scale}_tail.png')


def main():
    p = argparse.ArgumentParser()
    p.add_argument('out'); p.add_argument('--data', required=True); p.add_argument('--phase', choices=['evidence', 'study'], required=True)
    p.add_argument('--budget', type=float, default=240, help='evidence: seconds of training for the six runs together')
    p.add_argument('--deadline', type=float, default=400, help='seconds after which no job result is waited for')
    p.add_argument('--workers', type=int, default=None); p.add_argument('--toy', action='store_true')
    a = p.parse_args()
    t_start = time.time()
    import torch
    from coral_nb.reproduce import digits_study_jobs, cifar_study_jobs, study_config
    device = 'cuda' if torch.cuda.is_available() and not a.toy else 'cpu'
    out = Path(a.out); study, runs = out / 'study', Path(os.environ.get('TMPDIR', '/tmp')) / 'coral_gpu_runs'
    study.mkdir(parents=True, exist_ok=True); runs.mkdir(parents=True, exist_ok=True)
    data = prepare(Path(a.data), runs / 'data')
    summary = dict(phase=a.phase, device=device, device_name=torch.cuda.get_device_name(0) if device == 'cuda' else None,
                   torch=torch.__version__, cuda=torch.version.cuda, git_commit=os.environ.get('CORAL_NB_GIT_COMMIT'), toy=a.toy)
    if a.phase == 'evidence':
        summary['extractors'] = build_references(data, (32,), device, a.toy)
        probe = study_config('cifar32', 'coral', 0, root=data['lt'])
        if a.toy: probe = _toy(dict(cfg=probe))['cfg']
        s_step = time_steps(probe, data, device, 3 if a.toy else 20)
        # six runs share the GPU: each gets about a sixth of it; 15% spare for the other processes on the machine
        steps = 12 if a.toy else max(500, int(a.budget / (6 * s_step * 1.15) / 100) * 100)
        summary |= dict(coral_step_alone_s=round(s_step, 4), steps=steps)
        print(f"CORAL step alone: {1e3 * s_step:.1f} ms -> {steps} steps per run", flush=True)
        jobs = cifar_study_jobs('cifar32', data, steps=steps, ckpt_every=max(steps // 4, 1))
        if a.toy: jobs = [_toy(j) for j in jobs]
        res = run_pool(jobs, runs, study, device, a.workers or 6, a.toy, t_start + a.deadline)
        grids(study, runs, 'cifar32', 10, device)
    else:
        summary['extractors'] = build_references(data, (8, 16), device, a.toy)
        jobs = digits_study_jobs() + cifar_study_jobs('cifar16', data)
        jobs = [j for j in jobs if not isinstance(j, list)] + [j for j in jobs if isinstance(j, list)]
        if a.toy:   # two digits runs, the relative-imbalance one, one CIFAR run and the shared-folder chain
            plain = [j for j in jobs if not isinstance(j, list)]
            jobs = [_toy(j) for j in plain[:2] + [j for j in plain if j.get('balanced')][:1] + plain[-1:]] + [[_toy(x) for x in jobs[-1]]]
        res = run_pool(jobs, runs, study, device, a.workers or 12, a.toy, t_start + a.deadline)
        for scale, n in (('digits', 8), ('cifar16', 10)): grids(study, runs, scale, n, device)
    summary |= dict(jobs=[dict(names=r[0], status=r[1], seconds=r[2]) for r in res], wall_s=round(time.time() - t_start, 1),
                    failed=sum(r[1] != 'ok' for r in res))
    (out / f'gpu_study_{a.phase}.json').write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != 'jobs'}, indent=1))
    sys.exit(1 if summary['failed'] else 0)


if __name__ == '__main__': main()

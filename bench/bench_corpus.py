"""Benchmark `tools build-corpus mimic --csv` on a generated MIMIC-shaped NOTEEVENTS.csv.

Target: >= 50 MB/s on a 1 GB CSV using both cores, peak RSS < 500 MB and flat between
100 MB and 1 GB of input. The CSV is generated deterministically (seeded) with discharge-summary
structure, [** ... **] placeholders, trailing-space categories, ISERROR rows, quoted newlines and
duplicates, then the real console script runs on it while a sampler sums the RSS of its process
tree (main + workers) every 50 ms.

    .venv/bin/python bench/bench_corpus.py --size-mb 100 --size-mb 1024     # what make bench-corpus runs
Results: bench/out/corpus_bench.json and bench/out/corpus_bench.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY",
          "DESCRIPTION", "CGID", "ISERROR", "TEXT"]
CATEGORIES = ["Discharge summary", "Physician ", "Nursing", "Nursing/other", "Radiology", "Respiratory ",
              "Case Management ", "ECG", "Echo"]
WORDS = ("patient admitted with acute chronic heart failure exacerbation dyspnea orthopnea edema furosemide "
         "diuresis creatinine potassium sodium troponin negative chest pain atrial fibrillation warfarin "
         "metoprolol lisinopril hypertension diabetes mellitus insulin glucose pneumonia ceftriaxone "
         "azithromycin sputum culture fever leukocytosis lactate sepsis fluids blood pressure stable "
         "oxygen saturation nasal cannula extubated ventilator sedation propofol renal failure dialysis "
         "anemia transfusion hemoglobin platelets coagulopathy liver cirrhosis ascites paracentesis "
         "encephalopathy lactulose rifaximin stroke weakness aphasia tpa neurology consult imaging ct mri "
         "unremarkable follow outpatient clinic primary care physician weeks daily twice mg po iv").split()
SECTIONS = [("History of Present Illness:", 3), ("Past Medical History:", 1), ("Social History:", 1),
            ("Medications on Admission:", 1), ("Pertinent Results:", 1), ("Brief Hospital Course:", 4),
            ("Discharge Diagnosis:", 1), ("Discharge Instructions:", 1)]


def _paragraphs(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        sents = []
        for _ in range(rng.randint(3, 7)):
            w = [rng.choice(WORDS) for _ in range(rng.randint(8, 20))]
            sents.append(" ".join(w).capitalize() + ".")
        out.append(" ".join(sents))
    return out


def generate(path: Path, size_mb: float, seed: int = 0) -> Path:
    """Write a NOTEEVENTS-shaped CSV of about ``size_mb`` MB (cached by size and seed)."""
    if path.exists() and path.stat().st_size >= size_mb * 1_000_000:
        return path
    rng = random.Random(seed)
    pool = _paragraphs(rng, 600)
    target = int(size_mb * 1_000_000)
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    written, row_id, last = 0, 0, ""
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        while written < target:
            row_id += 1
            if last and rng.random() < 0.03:
                text = last  # an exact duplicate
            else:
                parts = [f"Admission Date:  [**2151-{rng.randint(1, 12)}-{rng.randint(1, 28)}**]    "
                         f"Discharge Date:   [**2151-{rng.randint(1, 12)}-{rng.randint(1, 28)}**]\n\nService: MEDICINE\n"]
                for head, k in SECTIONS:
                    body = "\n".join(rng.choice(pool) for _ in range(rng.randint(1, k)))
                    parts.append(f"{head}\n{body}\nSeen by Dr. [**First Name (STitle) {rng.randint(1, 9999)}**] "
                                 f"on [**2151-{rng.randint(1, 12)}-{rng.randint(1, 28)}**], "
                                 f"value {row_id}.{rng.randint(0, 99)}\n")
                text = "\n".join(parts)
                last = text
            row = [row_id, rng.randint(1, 99999), rng.randint(100000, 199999), "2151-07-16", "", "",
                   rng.choice(CATEGORIES), "Report", "", "1" if rng.random() < 0.01 else "", text]
            w.writerow(row)
            written += len(text) + 60
    os.replace(tmp, path)
    return path


def _tree_rss(pid: int, cpu: dict) -> tuple[int, int, int]:
    """(sum of RSS of the process and its descendants, main RSS, largest child RSS) in bytes;
    records each process's latest CPU seconds in ``cpu``."""
    import psutil

    try:
        p = psutil.Process(pid)
        main = p.memory_info().rss
        t = p.cpu_times()
        cpu["main"] = t.user + t.system
        kids = []
        for c in p.children(recursive=True):
            try:
                kids.append(c.memory_info().rss)
                t = c.cpu_times()
                cpu[c.pid] = t.user + t.system
            except psutil.Error:
                pass
        return main + sum(kids), main, max(kids, default=0)
    except psutil.Error:
        return 0, 0, 0


def run_once(csv_path: Path, out: Path, workers: int) -> dict:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    cmd = [str(Path(sys.executable).parent / "tools"), "build-corpus", "mimic", "--csv", str(csv_path),
           "--out", str(out), "--force", "--workers", str(workers), "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    errf = open(out.parent / f"{out.name}.stderr", "w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, env=env, text=True)
    samples = []
    cpu: dict = {}
    stop = threading.Event()
    load0 = os.getloadavg()[0]

    def sample():
        while not stop.is_set():
            total, main, child = _tree_rss(proc.pid, cpu)
            if total:
                samples.append((time.perf_counter() - t0, total, main, child))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    errf.seek(0)
    err_tail = errf.read()[-2000:]
    errf.close()
    if proc.returncode != 0:
        raise SystemExit(f"tools exited {proc.returncode}: {err_tail}")
    stats = json.loads(stdout)["manifest"]["extra"]["stats"]  # the --json shape: {path, manifest, results}
    cpu_seen = cpu
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    size = csv_path.stat().st_size
    steady = [s for s in samples if 0.2 * wall <= s[0] <= 0.9 * wall]
    workers_cpu = sorted((round(v, 2) for k, v in cpu_seen.items() if k != "main"), reverse=True)
    ncores = len(os.sched_getaffinity(0))
    return {"input_bytes": size, "wall_s": round(wall, 2), "mb_per_s": round(size / 1e6 / wall, 1),
            "cpu_s": round(cpu, 2), "cores_used": round(cpu / wall, 2), "workers": workers,
            "main_cpu_s": round(cpu_seen.get("main", 0), 2), "worker_cpu_s": workers_cpu,
            "mb_per_cpu_s": round(size / 1e6 / cpu, 1),
            # what the same CPU work gives when the cores are not shared with other jobs
            f"projected_mb_per_s_on_{ncores}_idle_cores": round(size / 1e6 / max(cpu / ncores, max(workers_cpu, default=0)), 1),
            "load_avg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "peak_rss_mb": round(max(s[1] for s in samples) / 2**20, 1) if samples else None,
            "peak_main_rss_mb": round(max(s[2] for s in samples) / 2**20, 1) if samples else None,
            "peak_worker_rss_mb": round(max(s[3] for s in samples) / 2**20, 1) if samples else None,
            "rss_at_20pct_mb": round(steady[0][1] / 2**20, 1) if steady else None,
            "rss_at_90pct_mb": round(steady[-1][1] / 2**20, 1) if steady else None,
            "notes_kept": stats.get("kept"), "notes_read": stats.get("rows"),
            "duplicates_dropped": stats.get("dropped_duplicate", 0),
            "samples": [(round(t, 2), round(r / 2**20, 1)) for t, r, _, _ in samples]}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for r in results:
        xs = [t / r["wall_s"] * r["input_bytes"] / 1e6 for t, _ in r["samples"]]
        ax.plot(xs, [m for _, m in r["samples"]],
                label=f"{r['input_bytes'] / 1e6:.0f} MB: {r['mb_per_s']} MB/s, {r['cores_used']} cores")
    ax.axhline(500, color="red", ls="--", lw=1, label="500 MB limit")
    ax.set_xlabel("input processed (MB, assuming a constant rate)")
    ax.set_ylabel("RSS of main + workers (MB)")
    ax.set_title("build-corpus mimic --csv")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, action="append",
                    help="CSV size in MB (repeatable; default 1024; the test runs 0.3)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--keep-data", action="store_true", help="Keep the generated CSVs and corpora.")
    a = ap.parse_args(argv)
    sizes = a.size_mb or [1024]
    results = []
    for mb in sizes:
        t0 = time.perf_counter()
        csv_path = generate(a.out / "data" / f"noteevents_{mb}mb_seed{a.seed}.csv", mb, a.seed)
        gen = time.perf_counter() - t0
        r = run_once(csv_path, a.out / "data" / f"corpus_{mb}mb", a.workers)
        r["generate_s"] = round(gen, 1)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "samples"}), flush=True)
        if not a.keep_data:
            csv_path.unlink()
            shutil.rmtree(a.out / "data" / f"corpus_{mb}mb", ignore_errors=True)
    summary = {"target": {"mb_per_s": 50, "peak_rss_mb": 500}, "cpus": len(os.sched_getaffinity(0)),
               "load_avg_at_end": os.getloadavg(), "results": results}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "corpus_bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, a.out / "corpus_bench.png")
    print(f"wrote {a.out / 'corpus_bench.json'} and corpus_bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

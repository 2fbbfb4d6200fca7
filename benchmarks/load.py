"""Load: N concurrent gradio_client clients × M requests against the app, good and bad inputs.

    python benchmarks/load.py [--clients 16] [--requests 200] [--bad-every 10] [--timeout 1800]

Starts ``app.py`` on 127.0.0.1 (a free port; or use ``--url`` and ``--pid`` for a running one),
asks every sample pair of every data set once on its own for its reference Dice, then runs the
clients, each a ``gradio_client.Client(url, ssl_verify=False)`` in its own thread (see
benchmarks/app_latency.py for why ``ssl_verify=False``), each sending ``--requests`` requests
one after another. Every ``--bad-every``-th request sends a file of the bad-input corpus
(tests/make_bad_inputs.py) instead of a sample pair.

An *unintended failure* is a good request that errors, times out or returns another Dice than
its reference, or a bad request that is not answered as the corpus says (a refusal with a
plain message, no traceback or server path; or a result). The run is bounded: no request is
started after ``--timeout`` seconds, and each waits at most ``--request-timeout``.

Reports p50/p95/p99 latency of the good requests, throughput, and the server process's resident
memory (psutil if installed, else /proc/<pid>/status) at the start, after ``--mark`` requests
(default 1,000) and at the end; prints a Markdown table and writes ``reports/load.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from apphelpers import examples, start_app  # noqa: E402
from make_bad_inputs import BadInput, good_pair, make  # noqa: E402

UGLY = re.compile(r"Traceback|File \"|(?:^|[\s'\"(])/(?:tmp|work|root|home|usr|etc|var|proc)/"
                  r"|site-packages|\.py\b")


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MB (10⁶ bytes), or None if it is gone."""
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss / 1e6
    except ImportError:
        pass
    except Exception:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-q * len(v) // 100)) - 1))
    return v[k]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int = 0
    good_ms: list = field(default_factory=list)
    bad_ms: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"good": 0, "bad": 0, "bad_refused": 0,
                                                  "bad_registered": 0, "timeouts": 0})


def judge_bad(item: BadInput, error: str | None, numbers) -> str | None:
    """None if the answer is what the corpus says for ``item``; else what is wrong."""
    if error is not None:
        if not error.strip() or UGLY.search(error):
            return f"not a plain message: {error[:200]!r}"
        if item.expect == "registered":
            return f"refused, expected a result: {error[:200]!r}"
        if item.match and not re.search(item.match, error):
            return f"unexpected message: {error[:200]!r}"
        return None
    if item.expect == "refused":
        return "registered, expected a refusal"
    if not isinstance(numbers, dict) or not 0 <= numbers.get("dice", -1) <= 1:
        return f"malformed result: {str(numbers)[:200]}"
    return None


def run(url: str, pid: int | None, clients: int = 16, requests: int = 200, bad_every: int = 10,
        timeout_s: float = 1800.0, request_timeout_s: float = 60.0, mark: int | None = None,
        n_examples: int | None = None, download_files: bool = False, log=print) -> dict:
    """Run the load against ``url`` (server process ``pid`` for memory); returns the report."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    total = clients * requests
    mark = min(1000, total // 2) if mark is None else mark
    goods = examples()[:n_examples] if n_examples else examples()
    tmp = tempfile.TemporaryDirectory(prefix="load-bad-")
    bads = make(tmp.name)
    good_moving = good_pair()["moving"]
    stride = next(s for s in (8, 7, 5, 3, 2, 1) if math.gcd(s, len(bads)) == 1)

    def new_client():
        return Client(url, verbose=False, ssl_verify=False, download_files=download_files)

    def call(client, moving, fixed):
        job = client.submit("mnist", handle_file(str(moving)), handle_file(str(fixed)), None,
                            None, api_name="/register")
        return job.result(timeout=request_timeout_s)[-1]

    # reference Dice of every sample pair, one request at a time
    c0 = new_client()
    reference = {}
    for e in goods:
        n = call(c0, e["moving"], e["fixed"])
        reference[e["fixed"]] = n["dice"]
    log(f"reference Dice of {len(goods)} sample pairs: "
        + ", ".join(f"{d:.3f}" for d in reference.values()))

    tally = Tally()
    memory = {"start": rss_mb(pid) if pid else None, "after_mark": None, "end": None,
              "peak": None}
    t_start = time.monotonic()
    deadline = t_start + timeout_s
    stop = threading.Event()

    def sample_memory():
        while not stop.wait(0.5):
            m = rss_mb(pid) if pid else None
            if m is not None:
                memory["peak"] = max(memory["peak"] or 0.0, m)

    def client_loop(ci: int):
        try:
            client = new_client()
        except Exception as e:
            with tally.lock:
                tally.failures.append({"client": ci, "what": "client", "error": repr(e)[:300]})
            return
        for i in range(requests):
            if time.monotonic() > deadline:
                return
            k = ci * requests + i
            bad = bad_every > 0 and k % bad_every == bad_every - 1
            if bad:
                # a stride coprime with the corpus size, so short runs see all kinds too
                item = bads[(k // bad_every * stride) % len(bads)]
                moving, fixed = item.moving or good_moving, item.path
            else:
                e = goods[k % len(goods)]
                moving, fixed = e["moving"], e["fixed"]
            t0 = time.perf_counter()
            error = numbers = None
            problem = None
            try:
                numbers = call(client, moving, fixed)
            except AppError as err:
                error = str(err)
            except TimeoutError:
                problem = f"no answer within {request_timeout_s:.0f} s"
            except Exception as err:   # connection trouble, queue full, …
                problem = f"{type(err).__name__}: {str(err)[:200]}"
            ms = (time.perf_counter() - t0) * 1e3
            if problem is None:
                if bad:
                    problem = judge_bad(item, error, numbers)
                elif error is not None:
                    problem = f"good request refused: {error[:200]!r}"
                elif abs(numbers["dice"] - reference[fixed]) > 1e-6:
                    problem = f"Dice {numbers['dice']} instead of {reference[fixed]}"
            with tally.lock:
                tally.done += 1
                tally.counts["bad" if bad else "good"] += 1
                if bad:
                    tally.bad_ms.append(ms)
                    tally.counts["bad_refused" if error is not None else "bad_registered"] += 1
                else:
                    tally.good_ms.append(ms)
                if problem is not None:
                    if "no answer" in problem:
                        tally.counts["timeouts"] += 1
                    tally.failures.append({"client": ci, "request": i,
                                           "input": Path(str(fixed)).name, "what": problem})
                done = tally.done
            if done == mark and pid:
                memory["after_mark"] = rss_mb(pid)
            if done % max(1, total // 10) == 0:
                log(f"  {done}/{total} requests, {time.monotonic() - t_start:.0f} s")

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client_loop, args=(ci,), daemon=True)
               for ci in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline + request_timeout_s + 5 - time.monotonic()))
    wall = time.monotonic() - t_start
    stop.set()
    memory["end"] = rss_mb(pid) if pid else None
    hung = sum(t.is_alive() for t in threads)
    tmp.cleanup()

    def r(x, nd=1):
        return None if x is None else round(x, nd)

    growth = (None if memory["after_mark"] is None or memory["end"] is None
              else memory["end"] - memory["after_mark"])
    return {
        "clients": clients, "requests_per_client": requests, "planned": total,
        "completed": tally.done, "good": tally.counts["good"], "bad": tally.counts["bad"],
        "bad_refused": tally.counts["bad_refused"],
        "bad_registered": tally.counts["bad_registered"],
        "unintended_failures": len(tally.failures) + hung,
        "failures": tally.failures[:50], "clients_still_running": hung,
        "timeouts": tally.counts["timeouts"],
        "latency_ms": {"p50": r(percentile(tally.good_ms, 50)),
                       "p95": r(percentile(tally.good_ms, 95)),
                       "p99": r(percentile(tally.good_ms, 99)),
                       "max": r(max(tally.good_ms, default=None))},
        "bad_latency_ms": {"p50": r(percentile(tally.bad_ms, 50)),
                           "p95": r(percentile(tally.bad_ms, 95)),
                           "max": r(max(tally.bad_ms, default=None))},
        "wall_s": r(wall, 2), "throughput_rps": r(tally.done / wall if wall else None, 2),
        "memory_mb": {"start": r(memory["start"]), "after_mark": r(memory["after_mark"]),
                      "end": r(memory["end"]), "peak": r(memory["peak"]),
                      "mark_requests": mark, "growth_mark_to_end": r(growth)},
        "reference_dice": {Path(k).name: v for k, v in reference.items()},
        "bad_every": bad_every, "download_files": download_files,
        "timeout_s": timeout_s, "request_timeout_s": request_timeout_s,
    }


def table(rep: dict) -> str:
    m, lat = rep["memory_mb"], rep["latency_ms"]

    def f(x, unit=""):
        return "—" if x is None else f"{x:,}{unit}"

    rows = [
        "| measure | value |", "|---|---:|",
        f"| clients × requests | {rep['clients']} × {rep['requests_per_client']} "
        f"({rep['planned']:,}) |",
        f"| completed (good / bad) | {rep['completed']:,} ({rep['good']:,} / {rep['bad']:,}) |",
        f"| bad inputs refused with a plain message / registered | {rep['bad_refused']} / "
        f"{rep['bad_registered']} |",
        f"| **unintended failures** | **{rep['unintended_failures']}** |",
        f"| latency of good requests p50 / p95 / p99 (max) | {f(lat['p50'])} / "
        f"{f(lat['p95'])} / {f(lat['p99'])} ms ({f(lat['max'])}) |",
        f"| throughput | {f(rep['throughput_rps'])} requests/s over {f(rep['wall_s'])} s |",
        f"| server memory (RSS) at start / after {m['mark_requests']:,} requests / end | "
        f"{f(m['start'])} / {f(m['after_mark'])} / {f(m['end'])} MB |",
        f"| growth from {m['mark_requests']:,} requests to the end (peak) | "
        f"{f(m['growth_mark_to_end'])} MB ({f(m['peak'])} MB) |",
    ]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200, help="per client")
    ap.add_argument("--bad-every", type=int, default=10,
                    help="every k-th request sends a bad input (0: none)")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="no request is started after this many seconds")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--mark", type=int, default=None,
                    help="memory checkpoint after this many requests (default 1,000)")
    ap.add_argument("--download-files", action="store_true",
                    help="clients also download the seven output pictures")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the app")
    ap.add_argument("--url", help="a running app instead of starting one")
    ap.add_argument("--pid", type=int, help="its server process, for memory")
    ap.add_argument("--out", default=str(ROOT / "reports" / "load.json"))
    args = ap.parse_args(argv)

    app = None
    load_before = os.getloadavg()
    if args.url:
        url, pid = args.url, args.pid
    else:
        app = start_app(threads=args.threads)
        app.wait_ready()
        url, pid = app.url, app.proc.pid
        print(f"app up in {app.cold_start_s:.1f} s at {url}")
    try:
        rep = run(url, pid, clients=args.clients, requests=args.requests,
                  bad_every=args.bad_every, timeout_s=args.timeout,
                  request_timeout_s=args.request_timeout, mark=args.mark,
                  download_files=args.download_files)
    finally:
        if app is not None:
            app.stop()
    rep["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                      "loadavg_before": [round(x, 2) for x in load_before],
                      "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                      "torch_threads": args.threads}
    rep["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2) + "\n")
    print()
    print(table(rep))
    for fl in rep["failures"][:10]:
        print(f"  failure: {fl}")
    print(f"\nwrote {out}")
    return 0 if rep["unintended_failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

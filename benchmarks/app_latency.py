"""App latency: cold start and round trips of one MNIST example through gradio_client.

Starts ``app.py`` on 127.0.0.1 (a free port), measures the cold start (process start → first
HTTP 200 on ``/``), then calls ``/register`` ``--n`` times with one sample pair (after
``--warmup`` calls that are not counted) and reports the median round trip. Prints a Markdown
table and writes ``reports/app_latency.json``.

    python benchmarks/app_latency.py [--n 20] [--example 4]

Targets: cold start ≤ 15 s, median round trip ≤ 500 ms. A round trip is what a gradio_client
user waits for: upload both images, queue, run, and download the seven output pictures, with
``Client(url, ssl_verify=False)`` (the server is plain HTTP on loopback; see SERIES below). Also
reported: the same with the default Client, the numbers without downloading the pictures
(``download_files=False``), and the server's own time per request (``request_ms``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from apphelpers import examples, start_app  # noqa: E402

COLD_START_TARGET_S = 15.0
MEDIAN_TARGET_MS = 500.0

# name: (what it measures, gradio_client.Client keyword arguments)
SERIES = {
    "plain_http": ("with pictures, ssl_verify=False", {"ssl_verify": False}),
    "default": ("with pictures, default Client", {}),
    "numbers_only": ("numbers + picture URLs only",
                     {"ssl_verify": False, "download_files": False}),
}
# The server is plain HTTP on loopback, so TLS settings mean nothing to it; but the default
# Client builds a fresh TLS context (~80 ms on a busy 2-CPU box) for every upload and every
# download, which would measure httpx's certificate loading seven times per request rather
# than the app.
PRIMARY = "plain_http"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20, help="timed round trips")
    ap.add_argument("--warmup", type=int, default=2, help="untimed round trips first")
    ap.add_argument("--example", type=int, default=4, help="1-based index in examples.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the app")
    ap.add_argument("--out", default=str(ROOT / "reports" / "app_latency.json"))
    args = ap.parse_args(argv)

    from gradio_client import Client, handle_file

    pair = examples()[args.example - 1]
    load_before = os.getloadavg()
    app = start_app(threads=args.threads)
    try:
        cold = app.wait_ready()
        clients = {name: Client(app.url, verbose=False, **kwargs)
                   for name, (_, kwargs) in SERIES.items()}

        def once(client):
            moving, fixed = handle_file(pair["moving"]), handle_file(pair["fixed"])
            t = time.perf_counter()
            out = client.predict("mnist", moving, fixed, None, None, api_name="/register")
            return (time.perf_counter() - t) * 1e3, out[-1]

        first_ms, _ = once(clients[PRIMARY])
        for client in clients.values():
            for _ in range(args.warmup):
                once(client)
        trips = {name: [] for name in SERIES}
        server = []
        for _ in range(args.n):   # interleaved, so a burst of background load hits all alike
            for name, client in clients.items():
                ms, numbers = once(client)
                trips[name].append(ms)
                server.append(numbers["request_ms"])
    finally:
        app.stop()

    def stats(values):
        v = sorted(values)
        return {"median_ms": round(statistics.median(v), 1),
                "p90_ms": round(v[max(0, int(round(0.9 * len(v))) - 1)], 1),
                "min_ms": round(v[0], 1)}

    series = {name: dict(stats(trips[name]), client_kwargs=SERIES[name][1],
                         what=SERIES[name][0]) for name in SERIES}
    med = series[PRIMARY]["median_ms"]
    srv = statistics.median(server)
    result = {
        "example": {"moving": str(Path(pair["moving"]).relative_to(ROOT)),
                    "fixed": str(Path(pair["fixed"]).relative_to(ROOT)),
                    "caption": pair["caption"]},
        "cold_start_s": round(cold, 3),
        "first_request_ms": round(first_ms, 1),
        "round_trips": args.n,
        "round_trip_median_ms": med,
        "round_trip_series": series,
        "primary_series": PRIMARY,
        "server_request_median_ms": round(srv, 1),
        "dice": numbers["dice"],
        "dice_without_localization": numbers["dice_without_localization"],
        "timings_ms": numbers["timings_ms"],
        "targets": {"cold_start_s": COLD_START_TARGET_S, "round_trip_median_ms": MEDIAN_TARGET_MS},
        "meets_targets": {"cold_start": cold <= COLD_START_TARGET_S,
                          "round_trip_median": med <= MEDIAN_TARGET_MS},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch_threads": args.threads},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    ok = {True: "yes", False: "**no**"}
    print(f"App latency ({pair['caption']}; {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.2f} before)\n")
    print("| measure | value | target | met |")
    print("|---|---:|---:|---|")
    print(f"| cold start (process start → first HTTP 200) | {cold:.2f} s | "
          f"≤ {COLD_START_TARGET_S:.0f} s | {ok[cold <= COLD_START_TARGET_S]} |")
    print(f"| first request after start | {first_ms:.0f} ms | | |")
    for name, st in series.items():
        target = f"≤ {MEDIAN_TARGET_MS:.0f} ms" if name == PRIMARY else ""
        met = ok[st["median_ms"] <= MEDIAN_TARGET_MS] if name == PRIMARY else ""
        print(f"| round trip, {st['what']}: median of {args.n} (p90) | {st['median_ms']:.0f} ms "
              f"({st['p90_ms']:.0f}) | {target} | {met} |")
    print(f"| server time per request, median | {srv:.0f} ms | | |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

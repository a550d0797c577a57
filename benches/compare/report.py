#!/usr/bin/env python3
"""Turns the runs of benches/compare/run into BENCHMARKS.md (printed on stdout).

Reads the meta.json the script wrote (machine, versions, parameters) and results.jsonl, one
line per race: {"tag": "main"|"sweep", "run", "system", "workload", "pool", "exit",
"result": <the JSON line redpacket-bench printed, or null>, "cas_retries"?}.

A system is judged on the median of its runs; the ratios redpacket / peer are computed within
each run (the same minute, the same machine state) and their median is reported.
"""

import json
import statistics
import sys

SYSTEMS = {
    "redpacket": "redpacket (3 nodes, loopback)",
    "postgres": "PostgreSQL CAS (synchronous_commit=on)",
    "redis-always": "Redis Lua (AOF, appendfsync always)",
    "redis-noaof": "Redis Lua (no AOF, no snapshots)",
}
WORKLOADS = ("hot", "many")
METRICS = [
    ("grabs_per_s", "grabs/s", "{:.0f}"),
    ("grab_p50_ms", "p50 ms", "{:.2f}"),
    ("grab_p99_ms", "p99 ms", "{:.2f}"),
    ("grab_p999_ms", "p99.9 ms", "{:.2f}"),
    ("sold_out_p99_ms", "sold-out p99 ms", "{:.2f}"),
    ("refusal_p99_ms", "after: new user p99 ms", "{:.2f}"),
    ("duplicate_p99_ms", "after: repeat p99 ms", "{:.2f}"),
]


def valid(rec):
    """A race counts if it printed its figures, exited cleanly and its money added up."""
    r = rec.get("result")
    return r is not None and rec["exit"] == 0 and r.get("verified") is True


def pair(res, name):
    """`p50 / p99` of one of the after-race histograms, if this bench reports it."""
    if f"{name}_p99_ms" not in res:
        return "—"
    return f"{res[name + '_p50_ms']:.2f} / {res[name + '_p99_ms']:.2f}"


def fmt_ratio(x):
    return "—" if x is None else f"{x:.2f}×"


def main(meta_path, results_path):
    meta = json.load(open(meta_path))
    recs = [json.loads(line) for line in open(results_path) if line.strip()]
    main_recs = [r for r in recs if r["tag"] == "main"]
    sweep_recs = [r for r in recs if r["tag"] == "sweep"]
    systems = [s for s in meta["systems"].split() if s in SYSTEMS]
    peers = [s for s in systems if s != "redpacket"]
    out = []
    w = out.append

    w("# Benchmarks: redpacket against PostgreSQL and Redis")
    w("")
    w(f"Written by `benches/compare/run` on {meta['started']} ({meta['elapsed']} s of runs). "
      "See `benches/compare/README.md` for what is compared, how each system is configured "
      "and how to run it again.")
    w("")
    w("## Machine and versions")
    w("")
    w("| | |")
    w("| --- | --- |")
    w(f"| CPU | {meta['cpu']} ({meta['nproc']} cores) |")
    w(f"| memory | {meta['memory']} |")
    w(f"| kernel | {meta['kernel']} |")
    if meta.get("fsync_probe"):
        w(f"| one 8 kB write + fdatasync (`pg_test_fsync`) | {' '.join(meta['fsync_probe'].split())} |")
    if meta.get("load_before"):
        w(f"| load average (1 min) before / after the runs | {meta['load_before']} / {meta.get('load_after', '?')} "
          "(anything above ~0 before means other work shared the 2 cores) |")
    w(f"| rustc | {meta['rustc']} |")
    groups = f", 3 nodes, {meta['groups']} Raft groups (`--groups`)" if meta.get("groups") else ""
    w(f"| redpacket | commit {meta['commit']}{groups} |")
    if meta.get("client_threads"):
        w(f"| load generator | `redpacket-bench`, its clients on {meta['client_threads']} thread(s) "
          "(`--client-threads`), the same for every system |")
    if meta.get("postgres"):
        w(f"| PostgreSQL | {meta['postgres']} |")
    if meta.get("postgres_settings"):
        w(f"| PostgreSQL settings | {meta['postgres_settings']} |")
    w(f"| Redis | {meta['redis']} |")
    w("")
    w("## Workloads")
    w("")
    w(f"- **hot**: one packet of {meta['hot_shares']} shares ({int(meta['hot_shares']) * 100} cents), "
      f"raced by {meta['concurrency']} concurrent clients until sold out.")
    w(f"- **many**: {meta['many_packets']} packets of {meta['many_shares']} shares; "
      f"{meta['concurrency']} concurrent clients grab random unfinished packets until all are sold out.")
    w("")
    w("Every grab is by a new, distinct user. A grab's latency is from the request to the "
      "acknowledged, durable (where the system is) answer; sold-out answers during the race are "
      "timed apart. After the race, more grabs on the sold-out packets (half by new users, who "
      "must be refused, half repeats by winners, who get their share again; "
      f"{(meta.get('refusals') + ' in all') if meta.get('refusals') else 'as many as redpacket-bench does by default'}) "
      "time the answers "
      "that cannot change (\"after\" columns). "
      "After each race every packet's claims must add up to its total, or the race is void. "
      f"{meta['runs']} run(s) of each system and workload; each run does every system in turn.")
    w("")

    # Pools used, and the sweep if there was one.
    if sweep_recs:
        w("## Pool sizes tried")
        w("")
        w("One race per pool size and workload before the runs; the best one was used for the runs.")
        w("")
        w("| system | workload | pool | grabs/s | p99 ms | verified |")
        w("| --- | --- | ---: | ---: | ---: | --- |")
        for r in sweep_recs:
            res = r.get("result") or {}
            w(f"| {r['system']} | {r['workload']} | {r['pool']} | "
              f"{res.get('grabs_per_s', 0):.0f} | {res.get('grab_p99_ms', 0):.2f} | "
              f"{'yes' if valid(r) else 'NO'} |")
        w("")

    # Medians.
    def runs_of(system, workload):
        return [r for r in main_recs if r["system"] == system and r["workload"] == workload]

    w("## Medians")
    w("")
    w(f"The median of the valid runs, metric by metric.")
    w("")
    w("| workload | system | pool | " + " | ".join(m[1] for m in METRICS) + " | valid runs |")
    w("| --- | --- | ---: | " + " | ".join("---:" for _ in METRICS) + " | ---: |")
    for wl in WORKLOADS:
        for s in systems:
            rs = runs_of(s, wl)
            ok = [r for r in rs if valid(r)]
            pools = sorted({r["pool"] for r in rs if r["pool"]})
            pool = ",".join(map(str, pools)) or "—"
            cells = []
            for key, _, f in METRICS:
                vals = [r["result"][key] for r in ok if key in r["result"]]
                cells.append(f.format(statistics.median(vals)) if vals else "—")
            w(f"| {wl} | {SYSTEMS[s]} | {pool} | " + " | ".join(cells) + f" | {len(ok)} of {len(rs)} |")
    w("")

    # CPU per grab, by process.
    cpu_rows = []
    for wl in WORKLOADS:
        ok = [r for r in runs_of("redpacket", wl) if valid(r) and r["result"].get("cpu_us_per_grab")]
        if not ok:
            continue
        roles = list(ok[0]["result"]["cpu_us_per_grab"])
        cells = [statistics.median(r["result"]["cpu_us_per_grab"].get(role, 0.0) for r in ok) for role in roles]
        # The cluster's own counters over the race (absent in results of older binaries).
        log = [statistics.median(r["result"][k] for r in ok) if all(k in r["result"] for r in ok) else None
               for k in ("ops_per_entry", "wal_fsyncs_per_s", "settled_after_s")]
        cpu_rows.append((wl, roles, cells, log))
    if cpu_rows:
        w("## Where redpacket's CPU goes")
        w("")
        w("CPU time (user + system, from `/proc`) spent during the race, divided by the grabs: "
          "the median of the valid runs. `nodes` is the three node processes together (each grab "
          "is applied on all three), `ledger` the payment stub, `client` the load generator. "
          f"The machine has {meta['nproc']} cores; a cluster saturates them at "
          "1 s × cores / (CPU per grab). Over the same race, from the nodes' own counters: the "
          "grabs and opens each `Batch` log entry carried, and the WAL fsyncs per second of the "
          "three nodes together. Last, how long after the race every payment had reached the "
          "ledger (the books then reconciled): a racing group's payments wait for the race to "
          "end, so the race's CPU leaves them out.")
        w("")
        w("| workload | " + " | ".join(f"{role} µs" for role in cpu_rows[0][1]) + " | total µs | ceiling grabs/s | ops per log entry | fsyncs/s | payments settled after, s |")
        w("| --- | " + " | ".join("---:" for _ in cpu_rows[0][1]) + " | ---: | ---: | ---: | ---: | ---: |")
        for wl, roles, cells, (per_entry, fsyncs, settled) in cpu_rows:
            total = sum(cells)
            ceiling = int(meta['nproc']) * 1e6 / total if total else 0
            log = (f"{per_entry:.1f}" if per_entry is not None else "—") + " | " + (f"{fsyncs:.0f}" if fsyncs is not None else "—") + " | " + (f"{settled:.1f}" if settled is not None else "—")
            w(f"| {wl} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {total:.1f} | {ceiling:.0f} | {log} |")
        w("")

    # Ratios within each run.
    if "redpacket" in systems and peers:
        w("## redpacket / peer")
        w("")
        w("Computed within each run, then the median. Throughput: above 1× redpacket grabs "
          "faster. p99 grab latency: below 1× redpacket answers faster.")
        w("")
        w("| workload | peer | throughput, per run | throughput, median | p99, per run | p99, median |")
        w("| --- | --- | --- | ---: | --- | ---: |")
        for wl in WORKLOADS:
            for p in peers:
                tp, lat = [], []
                for run in sorted({r["run"] for r in main_recs}):
                    a = [r for r in runs_of("redpacket", wl) if r["run"] == run and valid(r)]
                    b = [r for r in runs_of(p, wl) if r["run"] == run and valid(r)]
                    if not (a and b):
                        tp.append(None)
                        lat.append(None)
                        continue
                    ra, rb = a[0]["result"], b[0]["result"]
                    tp.append(ra["grabs_per_s"] / rb["grabs_per_s"] if rb["grabs_per_s"] else None)
                    lat.append(ra["grab_p99_ms"] / rb["grab_p99_ms"] if rb["grab_p99_ms"] else None)
                def med(xs):
                    xs = [x for x in xs if x is not None]
                    return statistics.median(xs) if xs else None
                w(f"| {wl} | {SYSTEMS[p]} | {', '.join(map(fmt_ratio, tp))} | **{fmt_ratio(med(tp))}** | "
                  f"{', '.join(map(fmt_ratio, lat))} | **{fmt_ratio(med(lat))}** |")
        w("")

    # Every run.
    w("## Every run")
    w("")
    w("| run | workload | system | pool | grabs/s | p50 ms | p99 ms | p99.9 ms | sold-out p99 ms | "
      "after: new user p50 / p99 ms | after: repeat p50 / p99 ms | "
      "s | grabs | attempts | sold out | busy | errors | CAS retries | verified |")
    w("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in sorted(main_recs, key=lambda r: (r["run"], WORKLOADS.index(r["workload"]), systems.index(r["system"]) if r["system"] in systems else 9)):
        res = r.get("result")
        if res is None:
            w(f"| {r['run']} | {r['workload']} | {r['system']} | {r['pool'] or '—'} | failed (exit {r['exit']}) "
              "| | | | | | | | | | | | | | |")
            continue
        w(f"| {r['run']} | {r['workload']} | {r['system']} | {r['pool'] or '—'} | {res['grabs_per_s']:.0f} | "
          f"{res['grab_p50_ms']:.2f} | {res['grab_p99_ms']:.2f} | {res['grab_p999_ms']:.2f} | "
          f"{res['sold_out_p99_ms']:.2f} | {pair(res, 'refusal')} | {pair(res, 'duplicate')} | {res['elapsed_s']:.1f} | {res['grabs']} | {res['attempts']} | "
          f"{res['sold_out']} | {res.get('busy', 0)} | {res['errors']} | {r.get('cas_retries', '—')} | "
          f"{'yes' if valid(r) else 'NO'} |")
    w("")
    w("<details><summary>The raw JSON lines</summary>")
    w("")
    w("```")
    for r in recs:
        w(json.dumps(r))
    w("```")
    w("")
    w("</details>")
    print("\n".join(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""C floor of the network data plane for ``postcopy bench``: TCP bulk throughput and
4 KiB request/response round trips (native/net_bench.c, run without the GIL), one
process on each testbed host, the way the agents run, with both ends placed on CPUs.

    python -m postcopy.bench.net server PORT [SESSIONS]
    python -m postcopy.bench.net bulk|rtt HOST PORT N [--client-cpu C] [--server-cpu C]
                                               [--rt-priority P] [--runs K (bulk)]
                                               [--into buffer|ram-copy|ram-prefault (bulk)]

The server answers SESSIONS sessions (default 2) and exits; each client session
prints one JSON line. :func:`measure` runs them all inside a :class:`Testbed`."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from postcopy.bench.floors import STRETCHES, floor_summary

GIB = 1 << 30
_NS = 1e-9
# Where the server puts bulk bytes (native/net_bench.h, ram_floor.h): one reused buffer
# (the raw link), or a new guest's RAM: fresh pages each installed with UFFDIO_COPY (the
# copy path's floor), or RAM populated before the data phase and received in place (the
# continue path with --prealloc).
INTO = {"buffer": 0, "ram-copy": 1, "ram-prefault": 2}


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _cpu_figures(res, moved_bytes: int | None) -> dict:
    """Each side's user and system CPU seconds (and per GiB moved, for bulk)."""
    sides = {"client": (res.client_user_ns, res.client_sys_ns), "server": (res.server_user_ns, res.server_sys_ns)}
    out = {}
    for side, (user, system) in sides.items():
        figures = {"user_s": user * _NS, "sys_s": system * _NS}
        if moved_bytes:
            figures["cpu_s_per_gib"] = (user + system) * _NS / (moved_bytes / GIB)
        out[side] = figures
    return out


def serve(port: int, sessions: int = 2) -> None:
    """Listen on every address of this host, say "ready", serve, return."""
    from postcopy._native import lib

    fd = _check(lib.pc_net_listen(b"0.0.0.0", port), f"listen on port {port}")
    try:
        print("ready", flush=True)
        _check(lib.pc_net_serve(fd, sessions), "serve")
    finally:
        os.close(fd)


def _placed(res) -> dict:
    return {"cpus": {"client": res.client_cpu, "server": res.server_cpu},
            "fifo": {"client": bool(res.client_fifo), "server": bool(res.server_fifo)}}


def bulk(host: str, port: int, nbytes: int, client_cpu: int = -1, server_cpu: int = -1, *, runs: int = 1,
         rt_priority: int = 0, into: str = "buffer") -> dict:
    """Send nbytes in 1 MiB send(2) calls (the client is the sender), ``runs`` times
    over as many sessions; the figures are those of the fastest run. rt_priority > 0:
    both ends run SCHED_FIFO at it (if allowed), as the agents' bulk threads do.
    ``into``: where the server puts the bytes (see INTO); ram-prefault also gives the
    seconds per GiB its populating took, before the data phase."""
    from postcopy._native import ffi, lib

    best = None
    rates = []
    for _ in range(runs):
        res = ffi.new("struct pc_net_result *")
        _check(lib.pc_net_bulk_into(host.encode(), port, nbytes, INTO[into], client_cpu, server_cpu, rt_priority,
                                    res), f"TCP bulk ({into}) to {host}:{port}")
        rates.append(nbytes / (res.elapsed_ns * _NS))
        if best is None or res.elapsed_ns < best.elapsed_ns:
            best = res
    result = {"bytes": nbytes, "seconds": best.elapsed_ns * _NS, "bytes_per_s": max(rates), "runs_bytes_per_s": rates,
              **_placed(best), "cpu": _cpu_figures(best, nbytes)}
    if into == "ram-prefault":
        result["prefault_s_per_gib"] = best.server_prep_ns * _NS / (nbytes / GIB)
    return result


def rtt(host: str, port: int, count: int, client_cpu: int = -1, server_cpu: int = -1, *,
        rt_priority: int = 0) -> dict:
    """count round trips of a 16-byte request and a 4 KiB reply (a demand fault's
    shape); rt_priority as for :func:`bulk` (the agents' demand threads)."""
    from postcopy._native import ffi, lib

    res = ffi.new("struct pc_net_result *")
    lat = ffi.new("uint64_t[]", count)
    _check(lib.pc_net_rtt(host.encode(), port, count, client_cpu, server_cpu, rt_priority, lat, res),
           f"TCP RTT to {host}:{port}")
    return {"latency_us": floor_summary([lat[i] / 1e3 for i in range(count)]), **_placed(res),
            "cpu": _cpu_figures(res, None)}


def measure(bed, placements: dict[str, tuple[int, int]], *, bulk_bytes: int, rtt_count: int,
            port: int, bulk_runs: int = STRETCHES) -> dict:
    """Bulk (best of bulk_runs) and round trips from the source host to the dest host,
    per placement (name -> (client CPU, server CPU)), and bulk into a new guest's RAM
    (one run each way, fresh RAM each): {"bulk": {name: ...}, "rtt": {name: ...},
    "into_ram": {"ram-copy": {name: ...}, "ram-prefault": {name: ...}}}. Both ends run
    at the real-time priority of the agents' threads of that kind."""
    from postcopy.kernel.priority import BULK_RT_PRIORITY, URGENT_RT_PRIORITY

    argv = [sys.executable, "-m", "postcopy.bench.net"]
    into_ram = [into for into in INTO if into != "buffer"]
    sessions = (bulk_runs + 1 + len(into_ram)) * len(placements)
    server = bed.popen(bed.dest, [*argv, "server", str(port), str(sessions)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"benchmark server did not start: {server.communicate(timeout=10)[1].strip()}")
        results: dict[str, dict] = {"bulk": {}, "rtt": {}, "into_ram": {into: {} for into in into_ram}}
        for name, (client_cpu, server_cpu) in placements.items():
            bulk_args = ["--rt-priority", str(BULK_RT_PRIORITY)]
            sessions_here = [("bulk", bulk_bytes, ["--runs", str(bulk_runs), *bulk_args], results["bulk"]),
                             ("rtt", rtt_count, ["--rt-priority", str(URGENT_RT_PRIORITY)], results["rtt"])]
            sessions_here += [("bulk", bulk_bytes, ["--into", into, *bulk_args], results["into_ram"][into])
                              for into in into_ram]
            for kind, n, extra, into_results in sessions_here:
                out = bed.run(bed.source, [*argv, kind, bed.dest.address, str(port), str(n), "--client-cpu",
                                           str(client_cpu), "--server-cpu", str(server_cpu), *extra],
                              timeout=120, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"TCP {kind} {' '.join(extra[:2])} ({name}) failed: {out.stderr.strip()[-500:]}")
                into_results[name] = json.loads(out.stdout)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m postcopy.bench.net", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("server", help="answer SESSIONS client sessions, then exit")
    s.add_argument("port", type=int)
    s.add_argument("sessions", type=int, nargs="?", default=2)
    for kind in ("bulk", "rtt"):
        c = sub.add_parser(kind, help="TCP bulk of N bytes" if kind == "bulk" else "N round trips of 4 KiB")
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("n", type=int)
        c.add_argument("--client-cpu", type=int, default=-1, help="pin the client here (default: unpinned)")
        c.add_argument("--server-cpu", type=int, default=-1, help="ask the server to pin itself here")
        c.add_argument("--rt-priority", type=int, default=0, help="SCHED_FIFO priority of both ends (0: none)")
        if kind == "bulk":
            c.add_argument("--runs", type=int, default=1, help="transfers, one session each; report the fastest")
            c.add_argument("--into", choices=tuple(INTO), default="buffer",
                           help="where the server puts the bytes: a reused buffer (default), or a new guest's RAM")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "server":
            serve(args.port, args.sessions)
            return 0
        if args.n <= 0:
            raise ValueError(f"N must be positive, not {args.n}")
        if args.command == "bulk":
            if args.runs <= 0:
                raise ValueError(f"--runs must be positive, not {args.runs}")
            result = bulk(args.host, args.port, args.n, args.client_cpu, args.server_cpu, runs=args.runs,
                          rt_priority=args.rt_priority, into=args.into)
        else:
            result = rtt(args.host, args.port, args.n, args.client_cpu, args.server_cpu, rt_priority=args.rt_priority)
        print(json.dumps(result))
    except (OSError, ValueError) as exc:
        print(f"postcopy.bench.net {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

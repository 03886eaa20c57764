"""``smss simulate``: the simulator's command line (one JSON object or a table of figures)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from smss.config import parse_size
from smss.control.cost import load_prices
from smss.control.tiers import TierProfile, parse_profile
from smss.errors import SmssError
from smss.sim import simulator
from smss.sim.config import SimConfig
from smss.sim.simulator import simulate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smss simulate", description=(simulator.__doc__ or "").split("\n")[0])
    d = SimConfig()
    p.add_argument("trace", type=Path, help="CSV trace: t_ms,function,duration_ms[,cluster]")
    p.add_argument(
        "--policy", default=d.policy, help="tiered[:key=value,...] | fixed:SECONDS | hybrid[:key=value,...]"
    )
    p.add_argument(
        "--default-ttl-s", type=float, default=d.default_ttl_s, help="fixed's / hybrid's fallback TTL"
    )
    p.add_argument("--memory-mb", type=int, default=d.memory_mb)
    p.add_argument("--cpu", type=float, default=d.cpu)
    p.add_argument("--gpu", type=float, default=d.gpu)
    p.add_argument(
        "--concurrency", type=int, default=d.concurrency, help="requests one instance serves at once"
    )
    p.add_argument("--max-instances", type=int, default=d.max_instances)
    p.add_argument(
        "--tiers",
        default="",
        help="each tier's start latency and memory, overriding the calibrated defaults: "
        + ",".join(f"{f.name}={getattr(d.tiers, f.name)!r}" for f in fields(TierProfile)),
    )
    p.add_argument(
        "--latency-objective-ms",
        type=float,
        default=d.latency_objective_ms,
        help="the latency a start may add at --latency-percentile (the tiered policy keeps it)",
    )
    p.add_argument("--latency-percentile", type=float, default=d.latency_percentile)
    p.add_argument(
        "--cold-start-ms",
        type=float,
        default=None,
        help="every start from a template takes this long (overrides --tiers' standby_ms and fork_ms)",
    )
    p.add_argument(
        "--first-start-ms",
        type=float,
        default=None,
        help="a start that builds the template takes this long (default: --cold-start-ms when given)",
    )
    p.add_argument("--tick-s", type=float, default=d.tick_s)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--speedup",
        type=float,
        default=d.speedup,
        help="replay K times faster: times, durations and the policy's windows / K (as bench replay)",
    )
    p.add_argument(
        "--keep-alive-s",
        type=float,
        default=None,
        help="the functions' own keep-alive, overriding the policy",
    )
    p.add_argument(
        "--nodes", type=int, default=None, help="a cluster of N nodes (default: one node nothing fills)"
    )
    p.add_argument(
        "--request-timeout-s", type=float, default=None, help="drop requests queued this long (live: 60)"
    )
    p.add_argument("--cpus-per-node", type=float, default=d.cpus_per_node, help="cores of each node")
    p.add_argument("--memory-per-node", default="4GiB", help="memory of each node, e.g. 4GiB")
    p.add_argument("--prices", type=Path, default=None, help="TOML price table overriding the defaults")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="also draw instances and tiers over time, cold starts, memory held and cost "
        "against containers (needs the plots extra)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = SimConfig(
            policy=args.policy,
            default_ttl_s=args.default_ttl_s,
            memory_mb=args.memory_mb,
            cpu=args.cpu,
            gpu=args.gpu,
            concurrency=args.concurrency,
            max_instances=args.max_instances,
            tiers=parse_profile(args.tiers),
            cold_start_ms=args.cold_start_ms,
            first_start_ms=args.first_start_ms,
            latency_objective_ms=args.latency_objective_ms,
            latency_percentile=args.latency_percentile,
            tick_s=args.tick_s,
            seed=args.seed,
            speedup=args.speedup,
            keep_alive_s=args.keep_alive_s,
            nodes=args.nodes,
            request_timeout_s=args.request_timeout_s,
            cpus_per_node=args.cpus_per_node,
            memory_per_node_mb=parse_size(args.memory_per_node) // (1 << 20),
            prices=load_prices(args.prices),
        )
        if args.plot is None:
            out = simulate(args.trace, config)
        else:
            from smss import plots
            from smss.sim.timeline import simulate_recorded

            out, timeline = simulate_recorded(args.trace, config)
            title = f"smss simulate {args.trace.name} --policy {config.policy}"
            plots.timeline_figure(args.plot, title, timeline)
            print(f"wrote {args.plot}", file=sys.stderr)
    except SmssError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        width = max(len(k) for k in out)
        for key, value in out.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

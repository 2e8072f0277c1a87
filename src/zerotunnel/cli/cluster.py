"""`zerotunnel up/down/status/exec/logs`: the local cluster (issue 5, DESIGN.md §1 and §4).

Thin: the work is in `zerotunnel.cluster.runner` (up/down/status) and the supervisor daemon it
starts. Progress goes to stderr, tables and JSON to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from zerotunnel.cluster import runner
from zerotunnel.cluster.state import DEFAULT_CLUSTER, ClusterDir, read_json
from zerotunnel.errors import InputError

_NAME = click.option("--name", default=DEFAULT_CLUSTER, show_default=True,
                     help="Cluster name (one cluster per name).")


def _progress(message: str) -> None:
    click.echo(f"  {message}", err=True)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _expiry(value: Any) -> str:
    return str(value)[:19].replace("T", " ") if value else "-"


def render_status(status: dict[str, Any]) -> str:
    """Nodes, then pods, then services, as aligned plain-text tables."""
    mode = status.get("mode", "netns")
    head = f"cluster {status.get('cluster')}: {status.get('phase')}"
    if mode == "loopback":
        head += " (loopback mode: no capture, no node proxies, no mTLS — development only)"
    elif not status.get("proxies", True):
        head += " (without node proxies: every pod is out of the mesh)"
    if status.get("config_error"):
        head += f"\nconfig change rejected (previous config in force): {status['config_error']}"
    cp = status.get("control_plane")
    if cp:
        pid = f" pid {cp['pid']}" if cp.get("pid") else ""
        head += f"\ncontrol plane {cp['address']}: {cp['state']}{pid}, {cp.get('restarts', 0)} restart(s)"
    out = [head, ""]
    nodes = [["NODE", "IP", "POD CIDR", "PROXY", "READY", "RESTARTS", "PODS SERVED"]]
    for n in status.get("nodes", []):
        nodes.append([n["name"], n.get("ip") or "-", n.get("pod_cidr") or "-",
                      f"{n.get('state')}" + (f" pid {n['pid']}" if n.get("pid") else ""),
                      "yes" if n.get("ready") else "no", str(n.get("restarts", 0)),
                      str(n.get("served_pods", "-")) if not n.get("api_error") else "api error"])
    out += [_table(nodes), ""]
    pods = [["POD", "NODE", "IP", "MESH", "IDENTITY", "READY", "STATUS", "RESTARTS", "CERT EXPIRY"]]
    for p in status.get("pods", []):
        pods.append([f"{p['namespace']}/{p['name']}", p["node"], p.get("ip") or "-",
                     "ambient" if p.get("ambient") else ("waypoint" if p.get("waypoint_of") else "none"),
                     p.get("identity") if p.get("ambient") or p.get("waypoint_of") else "-",
                     "yes" if p.get("ready") else "no", str(p.get("state")), str(p.get("restarts", 0)),
                     _expiry(p.get("cert_expiry"))])
    out.append(_table(pods))
    services = status.get("services", [])
    if services:
        rows = [["SERVICE", "VIP"]] + [[f"{s['namespace']}/{s['name']}", s["vip"]] for s in services]
        out += ["", _table(rows)]
    gateways = status.get("gateways") or []
    if gateways:  # issue 7: reachable from the host through the cluster's host veth
        rows = [["INGRESS GATEWAY", "ADDRESS (FROM THE HOST)", "SERVES", "HOSTS"]] + [
            [f"{g['namespace']}/{g['pod']}", ", ".join(f"{g['ip']}:{port}" for port in g.get("ports", []))
             or g["ip"], g.get("gateway", "-"), ", ".join(g.get("hosts", [])) or "*"] for g in gateways]
        out += ["", _table(rows)]
    return "\n".join(out)


@click.command("up")
@click.argument("directory", nargs=-1, required=True, type=click.Path(exists=True))
@_NAME
@click.option("--no-netns", is_flag=True,
              help="Loopback development mode without root: pods run in the host's network with a 127.0.0.x "
                   "POD_IP; no capture, no node proxies, no mTLS.")
@click.option("--no-proxies", is_flag=True, hidden=True,
              help="Run pods without node proxies (every pod out of the mesh); for runner development.")
@click.option("--control-plane/--standalone", default=True, show_default=True,
              help="Run the control plane (`zerotunnel control`: the mesh CA over gRPC, config over xDS) and "
                   "enrol each node proxy with a join token, so no node holds the CA key (the default); "
                   "--standalone gives the node proxies the config files and the CA directory instead.")
@click.option("--timeout", type=float, default=runner.DEFAULT_TIMEOUT, show_default=True,
              help="Seconds to wait for every pod to be ready.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def up(directory: tuple[str, ...], name: str, no_netns: bool, no_proxies: bool, control_plane: bool,
       timeout: float, output: str) -> None:
    """Build a mesh on this host from the YAML in DIRECTORY (or files), as `kubectl apply -f DIR`.

    A directory's top-level *.yaml/*.yml/*.json files are read (subdirectories are not, as without
    `kubectl -R`). Nodes and pods become network namespaces; ambient pods get in-pod capture and are
    served by their node's proxy; each pod's command runs in its namespace. Returns when every pod is
    ready, leaving a supervisor running until `zerotunnel down`; it applies edits to the YAML live.
    State, logs and the supervisor's pid are in /run/zerotunnel/NAME/ ($ZEROTUNNEL_STATE_DIR/NAME/).
    """
    if no_netns:
        click.echo("warning: --no-netns: loopback mode does NOT capture or encrypt traffic, and policies are "
                   "not enforced; it is for developing pod commands only", err=True)
    click.echo(f"zerotunnel up {' '.join(directory)} (cluster {name})", err=True)
    try:
        in_mesh = not no_netns and not no_proxies
        result = runner.up(list(directory), name, netns=not no_netns, proxies=not no_proxies,
                           control_plane=control_plane and in_mesh, exec_supervisor=False, timeout=timeout,
                           progress=_progress)
    except runner.ClusterError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    click.echo(f"ready in {result.seconds:.1f} s", err=True)
    status = runner.cluster_status(name)
    if output == "json":
        click.echo(json.dumps(status, indent=1, sort_keys=True))
    else:
        click.echo(render_status(status))
        hint = "" if name == DEFAULT_CLUSTER else f" --name {name}"
        click.echo(f"\nexplore: zerotunnel status{hint} | zerotunnel exec{hint} -n NS POD -- CMD | "
                   f"zerotunnel logs{hint} POD|node/NAME|control\nstop:    zerotunnel down{hint}", err=True)


@click.command("down")
@_NAME
def down(name: str) -> None:
    """Stop the cluster: every process, namespace, link, nftables table, hosts file and state file.

    Safe to run twice, and after a crash.
    """
    removed = runner.down(name, progress=_progress)
    if removed:
        click.echo(f"cluster {name} removed ({len(removed)} object(s))", err=True)
    else:
        click.echo(f"cluster {name}: nothing to remove", err=True)


@click.command("status")
@_NAME
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status(name: str, output: str) -> None:
    """Nodes, pods, IPs, identities, readiness, restarts and certificate expiry."""
    try:
        st = runner.cluster_status(name)
    except runner.ClusterError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    if output == "json":
        click.echo(json.dumps(st, indent=1, sort_keys=True))
    else:
        click.echo(render_status(st))


def _pod_from_status(name: str, namespace: str | None, pod: str) -> dict[str, Any]:
    try:
        st = runner.cluster_status(name, live=False)
    except runner.ClusterError as exc:
        raise InputError(exc.message) from exc
    return runner.find_pod(st, pod, namespace)


@click.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_NAME
@click.option("-n", "--namespace", default=None, help="The pod's namespace [default: the only pod so named].")
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str, namespace: str | None, pod: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside POD's network namespace (its hosts file too): `exec POD -- CMD ARGS…`.

    The command replaces this process, so stdin, the terminal and the exit status pass through.
    """
    p = _pod_from_status(name, namespace, pod)
    argv = list(command[1:] if command and command[0] == "--" else command)
    if not argv:
        raise InputError("no command given: zerotunnel exec POD -- CMD [ARGS…]")
    cdir = ClusterDir.for_cluster(name)
    pod_env = read_json(cdir.pod_dir(p["namespace"], p["name"]) / "env.json")
    if pod_env is not None:  # the first container's environment, as `kubectl exec` gives
        env = {str(k): str(v) for k, v in pod_env.items()}
        env.update({k: os.environ[k] for k in ("TERM", "COLUMNS", "LINES") if k in os.environ})
    else:
        env = dict(os.environ)
        env.update({"POD_NAME": p["name"], "POD_NAMESPACE": p["namespace"], "POD_IP": p.get("ip") or ""})
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    netns = p.get("netns")
    sys.stdout.flush()
    sys.stderr.flush()
    if netns:
        os.execvpe("ip", ["ip", "netns", "exec", netns, *argv], env)  # noqa: S606 - the user's command
    os.execvpe(argv[0], argv, env)  # noqa: S606 - the user's command, as `kubectl exec` runs it


def _log_path(cdir: ClusterDir, target: str, namespace: str | None, name: str) -> Path:
    if target == "control":
        return cdir.control_log
    if target == "control-plane":
        return cdir.log_dir / "control-plane.log"
    if target.startswith("node/"):
        return cdir.node_log(target.removeprefix("node/"))
    p = _pod_from_status(name, namespace, target.removeprefix("pod/"))
    return cdir.pod_log(p["namespace"], p["name"])


@click.command("logs")
@_NAME
@click.option("-n", "--namespace", default=None, help="The pod's namespace [default: the only pod so named].")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C or `down`.")
@click.argument("target")
def logs(name: str, namespace: str | None, follow: bool, target: str) -> None:
    """Print the log of a pod (POD), a node proxy (node/NAME), the supervisor (control) or, with
    `up --control-plane`, the control plane (control-plane)."""
    cdir = ClusterDir.for_cluster(name)
    path = _log_path(cdir, target, namespace, name)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise InputError(f"no log for {target} in cluster {name} ({path})") from None
    out = sys.stdout.buffer
    with f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow or not path.exists() or cdir.supervisor_pid() is None:
                break
            time.sleep(0.2)


@click.command("traffic", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def traffic(args: tuple[str, ...]) -> None:
    """Send requests between pods and explain each decision: [--name N] [-o json] [--expect D] NS/POD=URL…

    The same as `python -m zerotunnel.cluster.traffic` (see its --help).
    """
    from zerotunnel.cluster import traffic as matrix

    sys.exit(matrix.main(list(args)))

"""A Ray cluster for the two Ray runners (pipeline/ray_clip.py, pipeline/ray_batch.py): started bound to loopback,
or joined; and remote errors brought back as one line.

Ray on these machines: loopback only (what was found with Ray 2.60 on the 2-core dev machine, which has eth0 at
192.0.2.2 beside lo):

* `ray.init(_node_ip_address="127.0.0.1")` alone is not enough: `ray.init` passes the address through
  `services.resolve_ip_for_localhost`, which replaces any loopback address by the default-route interface's
  (192.0.2.2), and gcs_server, raylet and the workers then listen on all interfaces (`*:port` in `ss -ltnp`);
  `ray.nodes()` reports 192.0.2.2.
* `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` switches that off (`services.get_node_ip_address` then answers
  127.0.0.1, as Ray does on macOS/Windows to avoid firewall prompts): the node is 127.0.0.1 and every Ray process
  listens on 127.0.0.1 only. Ray reads the variable into `ray._private.ray_constants.ENABLE_RAY_CLUSTER` when
  it is imported, so `start_ray` sets both the variable (for the processes it starts) and the constant (this
  process may have imported Ray already), then checks `ray.nodes()` and refuses to run on anything else.
* Inside `unshare -n` with only `lo` up, Ray finds no route, logs "Failed to determine local IP via external
  connectivity", and falls back to 127.0.0.1 by itself; it works the same. Tests therefore need no network
  namespace here. `ray.init` takes 4–6 s on the loaded 2-core machine, `ray.shutdown` 1–1.5 s.

Joining a cluster (`address`) leaves the addresses to the cluster: multi-node needs a routable address.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import ray
from ray.exceptions import RayTaskError

from models.errors import UserError

# Ray's default object store is 30 % of RAM. A chunk's frames travel as one object, which must fit in it (a 4K
# chunk of 64 + 8 frames is 1.8 GB); the chunks in flight beyond its size spill to disk.
MAX_OBJECT_STORE_MB = 4096
LOOPBACK = "127.0.0.1"


def start_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None,
              object_store_mb: int | None = None) -> str | None:
    """Start a local single-node cluster bound to loopback, or join the cluster at `address`.

    The object store gets `object_store_mb`, by default a quarter of the RAM but at most MAX_OBJECT_STORE_MB.
    Returns the session folder of a cluster started here (a new temporary folder unless `temp_dir` is given;
    pass it to `stop_ray` to remove it), None when joining.
    """
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if address is not None:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        return None
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback-only cluster; no token file in ~/.ray
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by the processes Ray starts (see the docstring)
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # ... and by this one, which has imported Ray already
    # Ray's socket paths must stay under 108 bytes, hence a short folder in /tmp rather than one deep inside.
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="mambast-ray-")
    if object_store_mb is None:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        object_store_mb = min(MAX_OBJECT_STORE_MB, ram_mb // 4)
    ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, include_dashboard=False, _temp_dir=temp_dir,
             object_store_memory=object_store_mb * 2**20, logging_level=logging.ERROR, log_to_driver=False)
    addresses = sorted({node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]})
    if addresses != [LOOPBACK]:
        ray.shutdown()
        raise RuntimeError(f"Ray bound its node to {', '.join(addresses)}, not {LOOPBACK}; run it inside "
                           f"`unshare -n` or with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before Ray is imported")
    return temp_dir


def stop_ray(temp_dir: str | None = None) -> None:
    """Shut Ray down and remove the session folder `start_ray` returned."""
    ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def connect_ray(address: str | None, num_cpus: int | None = None) -> str | None:
    """Start a local loopback cluster (None), or join `address`; returns what `stop_ray` needs."""
    if address is not None and is_loopback(address):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # for the processes Ray starts
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False   # for this one (Ray read it when imported)
    return start_ray(address, num_cpus=num_cpus)


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def ray_get(refs):
    """ray.get, with a remote UserError raised as itself (one line), and other remote errors as their cause."""
    try:
        return ray.get(refs)
    except RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        if cause is not None:
            raise cause from error
        raise


def one_line(error: BaseException) -> str:
    """A remote error in one short line: a UserError's own message, else the type and the first sentence."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, UserError):
        return str(cause)
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    if isinstance(cause, ray.exceptions.RayActorError):  # Ray's text: a paragraph, the reason on its last line
        lines = [lines[-1].split(". ")[0].rstrip(".") + "."] if lines else []
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"

"""Split a data set into what each device and the server will hold, one file each.

    python -m fedapps.data.split [conf/EXPERIMENT.toml] --out devices/ [--set key=value ...]

The run config's data set and partitioner (or ``partition-file``) decide the split, exactly as a
simulation of the same config would: ``device-NNN.npz`` holds client NNN's train/val/test
samples, ``server.npz`` the server's unlabeled pool, and ``devices.json`` says what went where
and the node config each SuperNode needs. A deployment then runs with ``dataset = "devices"``
(see docs/deployment.md); the same seed gives the same files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from fedapps.config import CommandLine, RunConfig, parse_override, resolve, run_command
from fedapps.data.devices import (
    SPLITS,
    node_config_line,
    write_device_file,
    write_server_file,
)
from fedapps.data.federated import dataset_for, partition_for
from fedapps.data.registry import DataError

MANIFEST = "devices.json"


def split_for_devices(config: RunConfig, out: Path) -> Path:
    """Write every device's file, the server's file and the manifest; returns the manifest."""
    if config.dataset == "devices":
        raise DataError("dataset='devices' is already split; give the data set to split")
    dataset = dataset_for(config.dataset, config.data_path)
    partition = partition_for(config)
    out.mkdir(parents=True, exist_ok=True)
    devices = []
    for pid, client in enumerate(partition.clients):
        path = out / f"device-{pid:03d}.npz"
        splits = {name: (dataset.x[getattr(client, name)], dataset.y[getattr(client, name)])
                  for name in SPLITS}
        write_device_file(path, splits, dataset.num_classes, pid)
        devices.append({"file": path.name, "partition-id": pid,
                        **{name: len(getattr(client, name)) for name in SPLITS},
                        "node-config": node_config_line({"data-path": str(path.resolve()),
                                                         "device-name": path.stem})})
    server = out / "server.npz"
    write_server_file(server, dataset.x[partition.unlabeled], dataset.y[partition.unlabeled],
                      dataset.num_classes)
    manifest = out / MANIFEST
    manifest.write_text(json.dumps({
        "dataset": dataset.name, "seed": config.seed, "index-space": dataset.index_space,
        "server": {"file": server.name, "unlabeled": len(partition.unlabeled),
                   "run-config": f"dataset='devices' data-path='{server.resolve()}' "
                                 f"num-clients={partition.num_clients}"},
        "devices": devices,
    }, indent=1))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandLine(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", nargs="?", help="experiment file, e.g. conf/fedme-digits.toml")
    parser.add_argument("--out", type=Path, required=True, help="folder for the files")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    args = parser.parse_args(argv)
    config = RunConfig.from_mapping(resolve(args.config, dict(args.overrides)))
    manifest = split_for_devices(config, args.out)
    content = json.loads(manifest.read_text())
    print(f"fedapps.data.split: {len(content['devices'])} device files and server.npz in "
          f"{args.out}; server run config: {content['server']['run-config']}; each SuperNode's "
          f"node config: see {manifest}")
    return 0


if __name__ == "__main__":
    run_command(main)

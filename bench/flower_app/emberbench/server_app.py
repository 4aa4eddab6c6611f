"""The ServerApp: synchronous FedAvg rounds over every connected SuperNode, written with the
Grid's send_and_receive so each round's wall time is measured around exactly one round trip.

Writes one JSON line per round to the run config's ``out``: the round, its seconds, and in
``train`` mode the held-out accuracy of the new global model and seconds since the first round.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from emberbench import mlp

app = ServerApp()


def _wait_for_nodes(grid: Grid, count: int, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() > deadline:
            return nodes
        time.sleep(0.2)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    mode = str(cfg["mode"])
    nodes = _wait_for_nodes(grid, int(cfg["nodes"]))
    if mode == "rounds":
        rng = np.random.default_rng(0)
        weights = [rng.standard_normal(int(cfg["params"]), dtype=np.float32)]
        holdout = None
    else:
        init = np.load(str(cfg["init-path"]))
        weights = [init[name] for name in mlp.NAMES]
        data = np.load(str(cfg["holdout-path"]))
        holdout = (data["x"].astype(np.float32), data["y"].astype(np.int64))
    began = time.monotonic()
    with open(str(cfg["out"]), "a", encoding="utf-8") as out:
        for server_round in range(1, int(cfg["rounds"]) + 1):
            start = time.monotonic()
            config = ConfigRecord(
                {
                    "mode": mode,
                    "round": server_round,
                    "local-steps": int(cfg["local-steps"]),
                    "batch-size": int(cfg["batch-size"]),
                    "lr": float(cfg["lr"]),
                }
            )
            messages = [
                Message(
                    content=RecordDict({"arrays": ArrayRecord(weights), "config": config}),
                    dst_node_id=node,
                    message_type="train",
                    group_id=str(server_round),
                )
                for node in nodes
            ]
            replies = [r for r in grid.send_and_receive(messages) if r.has_content()]
            total = sum(float(r.content["metrics"]["num-examples"]) for r in replies)
            if replies:
                weights = [
                    sum(
                        r.content["arrays"].to_numpy_ndarrays()[i]
                        * (float(r.content["metrics"]["num-examples"]) / total)
                        for r in replies
                    ).astype(np.float32)
                    for i in range(len(weights))
                ]
            line = {
                "round": server_round,
                "seconds": time.monotonic() - start,
                "replies": len(replies),
                "nodes": len(nodes),
            }
            if holdout is not None:
                params = dict(zip(mlp.NAMES, weights, strict=True))
                line["accuracy"] = mlp.accuracy(params, *holdout)
                line["elapsed"] = time.monotonic() - began
            out.write(json.dumps(line) + "\n")
            out.flush()
            if holdout is not None and (
                line["accuracy"] >= float(cfg["target-accuracy"])
                or line["elapsed"] > float(cfg["max-seconds"])
            ):
                break
        out.write(json.dumps({"done": True}) + "\n")

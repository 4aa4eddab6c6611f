"""The ClientApp: echo P parameters back (round time), or train the digits MLP on this node's
shard (time to accuracy), slowed down like Ember's ``[simulation] slowdown`` where asked."""

from __future__ import annotations

import time
import zlib

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from emberbench import mlp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    config = msg.content["config"]
    if config["mode"] == "rounds":
        weights = arrays.to_numpy_ndarrays()
        reply = RecordDict(
            {
                "arrays": ArrayRecord(weights),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        return Message(content=reply, reply_to=msg)
    node = context.node_config
    data = np.load(f"{node['data-dir']}/digits-{node['partition-id']}.npz")
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    params = dict(zip(mlp.NAMES, arrays.to_numpy_ndarrays(), strict=True))
    began = time.monotonic()
    seed = zlib.crc32(f"{node['partition-id']}/{config['round']}".encode())
    new, loss = mlp.train(
        params,
        x,
        y,
        steps=int(config["local-steps"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        seed=seed,
    )
    slowdown = float(node.get("slowdown", 1.0))
    if slowdown > 1.0:
        time.sleep((slowdown - 1.0) * (time.monotonic() - began))
    reply = RecordDict(
        {
            "arrays": ArrayRecord([new[name] for name in mlp.NAMES]),
            "metrics": MetricRecord({"num-examples": len(y), "loss": loss}),
        }
    )
    return Message(content=reply, reply_to=msg)

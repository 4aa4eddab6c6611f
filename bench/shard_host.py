"""One aggregator shard in a process of its own, for the sharded-ingest benchmark.

``python -m bench.shard_host CONFIG_JSON`` starts Ember's
:class:`~agent.roles.shard.AggregatorShard` role for shard ``shard`` of ``job`` on the
benchmark's broker (through :class:`bench.harness.Host`, as the agent's runtime would), prints
``ready``, and runs until the line on stdin that ends the measurement; then it prints one JSON
line: the parts it took in and refused.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from agent.logs import configure_logging
from agent.memory import tune_allocator
from agent.protocol import Topics
from agent.roles.shard import AggregatorShard
from bench.harness import Host, bundle
from bench.models import mlp


async def main_async(config: dict[str, Any]) -> dict[str, Any]:
    model = await asyncio.to_thread(mlp, int(config["parameters"]))
    host = Host(str(config["url"]), Topics(str(config["prefix"])), Path(config["root"]))
    job_config = {**config["job_config"], "shard": int(config["shard"])}
    ctx = await host.context(
        f"shard-{config['shard']}",
        bundle(str(config["job"]), "aggregator_shard", job_config, model),
    )
    shard = AggregatorShard(ctx)
    task = asyncio.create_task(shard.run())
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # go
    await loop.run_in_executor(None, sys.stdin.readline)  # stop
    if task.done():
        task.result()  # the role failed: say why
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await host.close()
    return {"held": len(shard.store.parts), "rejections": shard.rejections}


def main() -> None:
    configure_logging("warning")
    tune_allocator()  # as ember-agent run does
    result = asyncio.run(main_async(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""The flow of each pipeline, keyed by lifecycle.runs.Pipeline: what the CLI runs and serve deploys."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from prefect import Flow

from flows.integrity import reconcile, verify
from flows.pipelines import expire, migrate, rebalance, replicate
from lifecycle.runs import PIPELINES, Pipeline

FLOWS: MappingProxyType[Pipeline, Flow[..., Any]] = MappingProxyType(
    {
        Pipeline.REPLICATE: replicate,
        Pipeline.MIGRATE: migrate,
        Pipeline.EXPIRE: expire,
        Pipeline.REBALANCE: rebalance,
        Pipeline.VERIFY: verify,
        Pipeline.RECONCILE: reconcile,
    }
)
if set(FLOWS) != set(PIPELINES):  # a pipeline added to the registry needs its flow here
    raise RuntimeError(f"flows missing for {sorted(set(PIPELINES) - set(FLOWS))}")

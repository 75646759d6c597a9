"""The development rig: real parts to run DLM against, outside the runtime core.

A local SeaweedFS S3 server (seaweed; its `weed` binary comes from the optional `s3rig` extra),
a fresh PostgreSQL database per caller (postgres), a real Prefect server on a free port
(prefect_server), and a Prefect server with DLM deployed on a process work pool and `prefect
worker` processes (workers). Used by tests/, bench/ and `dlm demo`;
nothing in lifecycle/, tasks/, flows/ or deployments/ imports it.
"""

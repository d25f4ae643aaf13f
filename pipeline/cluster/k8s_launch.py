"""Run one multi-node training on Kubernetes: the workers' Job and Service first, then node 0 through Pipes.

`PipesK8sClient` (dagster-k8s) launches node 0, hands it the Pipes context, reads the Pipes
messages from its log, waits for it and deletes it; it raises when node 0 fails. The workers
need no watching of their own: they cannot finish without node 0, and if one fails, node 0
fails within the process-group timeout naming the lost rank. Whatever happened, the Job and
the Service are deleted afterwards, so no worker pod outlives the run.
"""

from __future__ import annotations

import dagster as dg

from pipeline.cluster.k8s_spec import KubernetesTraining, TrainingJobSpec, training_job_spec, training_name
from pipeline.config import TorchrunConfig


def run_training_on_kubernetes(context: dg.AssetExecutionContext, cluster: KubernetesTraining,
                               torchrun: TorchrunConfig, module: str, args: list[str], *,
                               deadline_s: float | None = None,
                               pipes_client=None) -> dg.PipesClientCompletedInvocation:
    """Train on `torchrun.nnodes` pods; `args` are the trainer's flags with paths under the artifacts root.

    The objects are named after the module ("train", "finetune") and the run, so the two
    trainings of one run never share a name.
    """
    from dagster_k8s import PipesK8sClient

    try:
        spec = training_job_spec(cluster, torchrun, module, args, deadline_s=deadline_s,
                                 name=training_name(context.run.run_id, module.rsplit(".", 1)[-1]))
    except ValueError as e:
        raise dg.Failure(f"cannot start the training on Kubernetes: {e}") from e
    client = pipes_client or PipesK8sClient()
    core, batch = _kubernetes_apis()
    context.log.info(f"starting {torchrun.nnodes - 1} worker node(s) as Job {spec.name}-w in {spec.namespace}")
    core.create_namespaced_service(spec.namespace, spec.service)
    try:
        batch.create_namespaced_job(spec.namespace, spec.workers_job)
        return client.run(context=context, namespace=spec.namespace, base_pod_meta=spec.node0_meta,
                          base_pod_spec=spec.node0_spec)
    finally:
        _delete(spec, core, batch, context)


def _kubernetes_apis():
    """API clients configured as PipesK8sClient configures its own: in-cluster when running in a pod."""
    import os

    import kubernetes

    if os.getenv("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config()
    else:
        kubernetes.config.load_kube_config()
    return kubernetes.client.CoreV1Api(), kubernetes.client.BatchV1Api()


def _delete(spec: TrainingJobSpec, core, batch, context: dg.AssetExecutionContext) -> None:
    from kubernetes.client.exceptions import ApiException

    for what, delete in ((f"Job {spec.name}-w", lambda: batch.delete_namespaced_job(
                              f"{spec.name}-w", spec.namespace, propagation_policy="Foreground")),
                         (f"Service {spec.name}", lambda: core.delete_namespaced_service(spec.name, spec.namespace))):
        try:
            delete()
        except ApiException as e:
            if e.status != 404:  # already gone is what we wanted
                context.log.warning(f"could not delete {what} in {spec.namespace}: {e.reason}")

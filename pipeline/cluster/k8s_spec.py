"""The Kubernetes objects that run one multi-node training: node 0 as a Pipes pod, nodes 1..N-1 as an Indexed Job.

For a training asset with `nnodes > 1`, Dagster launches node 0 through `PipesK8sClient`
(see pipeline.cluster.k8s_launch), so node 0 carries the Pipes context and its logs carry
the Pipes messages. Nodes 1..N-1 are one Indexed Job, created just before. Every pod runs
one torchrun agent with c10d rendezvous at node 0:

    <name>-0.<name>:<port>   node 0's DNS name, from its hostname and the headless Service <name>
    <name>-w-<i>.<name>      the workers' names, i = the Job's completion index

torchrun's c10d rendezvous numbers the nodes by sorting their `--local-addr`; "<name>-0."
sorts before every "<name>-w-<i>.", so node 0 always holds global rank 0, the only rank
that talks to Pipes (nanogpt_core.pipes_bridge). Node 0's agent hosts the rendezvous store
(`is_host=1`); the workers only join it. No process restarts alone (`--max-restarts=0`,
`backoffLimit: 0`): a lost node ends the whole run, within the process-group timeout.

Everything here is plain data (the Kubernetes API's JSON), so it can be tested without a
cluster and printed for `kubectl`:

    python -m pipeline.cluster.k8s_spec --image REGISTRY/nanogpt:TAG --artifacts-claim artifacts \\
        --artifacts-path /artifacts --nnodes 4 --nproc-per-node 8 -- --profile gpt2-124m --data ... --out ...
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import dagster as dg
import yaml
from pydantic import Field

from pipeline.config import TorchrunConfig

TRAINING_LABEL = "nanogpt.io/training"  # every pod and the Service of one training share its value
NODE_LABEL = "nanogpt.io/node"  # "0" on node 0, "worker" on the rest
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
MAX_NAME_LENGTH = 40  # leaves room for "-w-<index>" within a 63-character DNS label
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class KubernetesTraining(dg.ConfigurableResource):
    """Where and how the training pods run; the same settings serve every training asset."""

    image: str = Field(description="container image with the project installed (its Python runs torchrun)")
    namespace: str = Field("default", description="namespace for the training pods, Job and Service")
    artifacts_claim: str = Field(description="PersistentVolumeClaim (ReadWriteMany) holding the artifacts root")
    artifacts_path: str = Field(description="where that claim is mounted: the artifacts root the Dagster run uses")
    gpus_per_node: Optional[int] = Field(None, ge=0, description="GPUs per pod (default: nproc_per_node)")
    gpu_resource: str = Field("nvidia.com/gpu", description="the extended resource name GPUs go by")
    rdzv_port: int = Field(29400, description="port of the c10d rendezvous store on node 0")
    join_timeout_s: int = Field(900, gt=0, description="how long an agent waits for all nodes to join")
    shm_size: str = Field("16Gi", description="size of /dev/shm (NCCL and the data loader use it)")
    service_account: Optional[str] = Field(None, description="service account for the training pods")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node labels the pods must match")
    python: str = Field("python", description="the image's Python")


# How a deployment turns the Kubernetes launch on for the training assets: set on the run
# pods (for example through the Helm chart's run launcher env), read when a training starts.
CLUSTER_ENV = {"image": "NANOGPT_K8S_IMAGE", "namespace": "NANOGPT_K8S_NAMESPACE",
               "artifacts_claim": "NANOGPT_K8S_ARTIFACTS_CLAIM", "artifacts_path": "NANOGPT_K8S_ARTIFACTS_PATH",
               "service_account": "NANOGPT_K8S_SERVICE_ACCOUNT"}


def cluster_from_env(environ: Mapping[str, str] = os.environ) -> KubernetesTraining | None:
    """The cluster settings from NANOGPT_K8S_*; None when NANOGPT_K8S_IMAGE is unset (no cluster).

    The artifacts path defaults to the artifacts root this process uses (NANOGPT_ARTIFACTS),
    since the trainer's paths are that root's paths.
    """
    if not environ.get(CLUSTER_ENV["image"]):
        return None
    if not environ.get(CLUSTER_ENV["artifacts_claim"]):
        raise ValueError(f"{CLUSTER_ENV['image']} is set but {CLUSTER_ENV['artifacts_claim']} is not: the training "
                         f"pods need the PersistentVolumeClaim that holds the artifacts root")
    values = {field: environ[var] for field, var in CLUSTER_ENV.items() if environ.get(var)}
    values.setdefault("artifacts_path", str(Path(environ.get("NANOGPT_ARTIFACTS", "artifacts")).resolve()))
    return KubernetesTraining(**values)


@dataclass(frozen=True)
class TrainingJobSpec:
    name: str
    namespace: str
    service: dict[str, Any]  # headless: gives node 0 and the workers their DNS names
    node0_meta: dict[str, Any]  # PipesK8sClient's base_pod_meta
    node0_spec: dict[str, Any]  # PipesK8sClient's base_pod_spec
    workers_job: dict[str, Any]  # nodes 1..N-1

    def manifests(self) -> list[dict[str, Any]]:
        """The three objects as `kubectl apply` takes them (node 0 as a bare Pod, without the Pipes
        environment that PipesK8sClient adds when Dagster launches it)."""
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**self.node0_meta, "name": f"{self.name}-0",
                                                                 "namespace": self.namespace},
               "spec": self.node0_spec}
        return [self.service, pod, self.workers_job]


def training_name(run_id: str, asset: str) -> str:
    """A DNS-safe name for one training: the asset and the start of the Dagster run id."""
    stem = re.sub(r"[^a-z0-9]+", "-", asset.lower()).strip("-")[:MAX_NAME_LENGTH - 9]
    return f"{stem}-{run_id.replace('-', '')[:8].lower()}"


def node_command(settings: KubernetesTraining, torchrun: TorchrunConfig, name: str, module: str, args: list[str],
                 *, local_addr: str, is_host: bool) -> list[str]:
    """One node's torchrun command line; the nodes differ only in their address and who hosts the store."""
    return [settings.python, "-m", "torch.distributed.run",
            f"--nnodes={torchrun.nnodes}", f"--nproc_per_node={torchrun.nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={name}-0.{name}:{settings.rdzv_port}", f"--rdzv-id={name}",
            f"--rdzv-conf=is_host={int(is_host)},join_timeout={settings.join_timeout_s}",
            f"--local-addr={local_addr}", "--max-restarts=0", "-m", module, *args]


def training_job_spec(settings: KubernetesTraining, torchrun: TorchrunConfig, module: str, args: list[str], *,
                      name: str, deadline_s: float | None = None) -> TrainingJobSpec:
    """The Service, node 0's pod and the workers' Job for `torchrun.nnodes` nodes of `nproc_per_node` each."""
    if torchrun.nnodes < 2:
        raise ValueError(f"nnodes={torchrun.nnodes}: one node trains with a local torchrun, not a cluster job")
    if torchrun.rdzv_endpoint:
        raise ValueError(f"rdzv_endpoint={torchrun.rdzv_endpoint!r} was given, but on Kubernetes the rendezvous is "
                         f"node 0's pod ({name}-0.{name}:{settings.rdzv_port}); leave rdzv_endpoint unset")
    if len(name) > MAX_NAME_LENGTH or not _DNS_LABEL.fullmatch(name):
        raise ValueError(f"training name {name!r} must be a DNS label (lower-case letters, digits, '-') of at most "
                         f"{MAX_NAME_LENGTH} characters")
    gpus = torchrun.nproc_per_node if settings.gpus_per_node is None else settings.gpus_per_node
    labels = {TRAINING_LABEL: name, "app.kubernetes.io/part-of": "nanogpt-pipeline"}
    deadline = {"activeDeadlineSeconds": int(deadline_s)} if deadline_s else {}

    def container(command: list[str], extra_env: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "name": "trainer", "image": settings.image, "command": command,
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *extra_env],
            "ports": [{"name": "c10d", "containerPort": settings.rdzv_port}],
            "volumeMounts": [{"name": "artifacts", "mountPath": settings.artifacts_path},
                             {"name": "dshm", "mountPath": "/dev/shm"}],
            **({"resources": {"limits": {settings.gpu_resource: gpus}}} if gpus else {}),
        }

    def pod_spec(command: list[str], extra_env: list[dict[str, Any]]) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "subdomain": name, "restartPolicy": "Never", "containers": [container(command, extra_env)],
            "volumes": [{"name": "artifacts", "persistentVolumeClaim": {"claimName": settings.artifacts_claim}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}],
            **deadline,
        }
        if settings.service_account:
            spec["serviceAccountName"] = settings.service_account
        if settings.node_selector:
            spec["nodeSelector"] = dict(settings.node_selector)
        return spec

    node0_spec = {"hostname": f"{name}-0", **pod_spec(
        node_command(settings, torchrun, name, module, args, local_addr=f"{name}-0.{name}", is_host=True), [])}
    # Kubernetes expands $(VAR) in a command only for variables the container declares.
    index_env = [{"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}}]
    worker_spec = pod_spec(node_command(settings, torchrun, name, module, args,
                                        local_addr=f"{name}-w-$(JOB_COMPLETION_INDEX).{name}", is_host=False),
                           index_env)
    workers = torchrun.nnodes - 1
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{name}-w", "namespace": settings.namespace, "labels": labels},
        "spec": {"completionMode": "Indexed", "completions": workers, "parallelism": workers, "backoffLimit": 0,
                 "ttlSecondsAfterFinished": 3600, **deadline,
                 "template": {"metadata": {"labels": {**labels, NODE_LABEL: "worker"}}, "spec": worker_spec}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        # Headless, and listing pods before they are ready: the agents resolve each other while
        # starting, long before any readiness a probe could report.
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {TRAINING_LABEL: name},
                 "ports": [{"name": "c10d", "port": settings.rdzv_port, "targetPort": settings.rdzv_port}]},
    }
    return TrainingJobSpec(name=name, namespace=settings.namespace, service=service,
                           node0_meta={"labels": {**labels, NODE_LABEL: "0"}}, node0_spec=node0_spec,
                           workers_job=job)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster.k8s_spec",
                                     description="Print the Kubernetes objects of one multi-node training as YAML.")
    parser.add_argument("--image", required=True)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--artifacts-claim", required=True)
    parser.add_argument("--artifacts-path", required=True)
    parser.add_argument("--nnodes", type=int, required=True)
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--module", default="nanogpt_core.train", help="nanogpt_core.train | nanogpt_core.finetune")
    parser.add_argument("--name", default="nanogpt-train")
    parser.add_argument("trainer_args", nargs="*", help="the trainer's own flags, after --")
    args = parser.parse_args(argv)
    settings = KubernetesTraining(image=args.image, namespace=args.namespace, artifacts_claim=args.artifacts_claim,
                                  artifacts_path=args.artifacts_path)
    try:
        spec = training_job_spec(settings, TorchrunConfig(nnodes=args.nnodes, nproc_per_node=args.nproc_per_node),
                                 args.module, args.trainer_args, name=args.name)
    except ValueError as e:
        sys.exit(f"error: {e}")
    yaml.safe_dump_all(spec.manifests(), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()

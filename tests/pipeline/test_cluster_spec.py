"""The Kubernetes objects of a multi-node training, generated from TorchrunConfig.

No cluster runs here, so these check what a cluster would be given: each node's torchrun
command, who gets which rank, how the nodes find each other, and that only node 0 (where
global rank 0 lives) carries the Pipes environment. The objects are checked against the
Kubernetes client's own models, and node 0's pod is built by dagster-k8s exactly as
PipesK8sClient builds it.
"""

from __future__ import annotations

import io
import random
from contextlib import redirect_stdout

import dagster as dg
import kubernetes
import pytest
import yaml
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from dagster_k8s.pipes import build_pod_body
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc

from nanogpt_core.pipes_bridge import launched_through_pipes
from pipeline.cluster.k8s_spec import (NODE_LABEL, TRAINING_LABEL, KubernetesTraining, cluster_from_env, main,
                                       training_job_spec, training_name)
from pipeline.config import TorchrunConfig

SETTINGS = KubernetesTraining(image="registry.example/nanogpt:1.0", namespace="ml", artifacts_claim="artifacts",
                              artifacts_path="/artifacts")
ARGS = ["--profile", "gpt2-124m", "--data", "/artifacts/token_shards/abc", "--out", "/artifacts/runs/r1", "--resume"]
NAME = "pretrained-checkpoint-1a2b3c4d"


@pytest.fixture(scope="module")
def spec():
    return training_job_spec(SETTINGS, TorchrunConfig(profile="gpt2-124m", nnodes=4, nproc_per_node=8),
                             "nanogpt_core.train", ARGS, name=NAME, deadline_s=86400)


def as_model(model_class, data: dict):
    """The Kubernetes client's model of `data`; raises on any key the API does not define, at any depth."""
    return k8s_model_from_dict(model_class, k8s_snake_case_dict(model_class, data))


def flags(command: list[str]) -> dict[str, str]:
    """torchrun's own `--flag=value` options (those before `-m`)."""
    launcher = command[:command.index("-m", 3)]
    return dict(part[2:].split("=", 1) for part in launcher if part.startswith("--"))


def node0_command(spec) -> list[str]:
    return spec.node0_spec["containers"][0]["command"]


def worker_command(spec) -> list[str]:
    return spec.workers_job["spec"]["template"]["spec"]["containers"][0]["command"]


def test_every_node_runs_the_same_trainer_under_torchrun_with_c10d_rendezvous_at_node_0(spec):
    for command in (node0_command(spec), worker_command(spec)):
        assert command[:3] == ["python", "-m", "torch.distributed.run"]
        assert command[command.index("-m", 3):] == ["-m", "nanogpt_core.train", *ARGS]
        options = flags(command)
        assert options["nnodes"] == "4" and options["nproc_per_node"] == "8"
        assert options["rdzv-backend"] == "c10d" and options["rdzv-id"] == NAME
        assert options["rdzv-endpoint"] == f"{NAME}-0.{NAME}:29400"
        assert options["max-restarts"] == "0"  # a lost node ends the run; nothing restarts alone
    assert flags(node0_command(spec))["rdzv-conf"] == "is_host=1,join_timeout=900"
    assert flags(worker_command(spec))["rdzv-conf"] == "is_host=0,join_timeout=900"


def test_node_0_is_reachable_at_the_rendezvous_endpoint_and_every_worker_by_its_own_name(spec):
    service, node0, template = spec.service, spec.node0_spec, spec.workers_job["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["metadata"]["name"] == NAME == node0["subdomain"] == template["spec"]["subdomain"]
    selector = service["spec"]["selector"]
    for labels in (spec.node0_meta["labels"], template["metadata"]["labels"]):
        assert selector.items() <= labels.items()
    # DNS name <hostname>.<subdomain>: node 0 sets its hostname, an Indexed Job's pods get <job>-<index>.
    assert f"{node0['hostname']}.{node0['subdomain']}" == flags(node0_command(spec))["local-addr"]
    job_name = spec.workers_job["metadata"]["name"]
    assert flags(worker_command(spec))["local-addr"] == f"{job_name}-$(JOB_COMPLETION_INDEX).{NAME}"
    # Kubernetes expands $(JOB_COMPLETION_INDEX) only because the container declares it.
    env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_the_workers_are_one_indexed_job_for_nodes_1_to_n_minus_1_that_never_retries(spec):
    job = spec.workers_job["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == 3
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["activeDeadlineSeconds"] == spec.node0_spec["activeDeadlineSeconds"] == 86400
    assert spec.node0_meta["labels"][NODE_LABEL] == "0"
    assert job["template"]["metadata"]["labels"][NODE_LABEL] == "worker"


def test_node_0_holds_global_rank_0_by_torchruns_own_ordering_of_nodes():
    """c10d numbers nodes by sorting their descriptors (address first); node 0 must come first
    for any number of workers and any process ids, or Pipes would hear from nobody."""
    for workers in (1, 2, 9, 10, 11, 99, 100, 250):
        spec = training_job_spec(SETTINGS, TorchrunConfig(nnodes=workers + 1, nproc_per_node=2), "nanogpt_core.train",
                                 ARGS, name=NAME)
        template = flags(worker_command(spec))["local-addr"]
        nodes = [_NodeDesc(flags(node0_command(spec))["local-addr"], random.randint(1, 4_000_000), 0)]
        nodes += [_NodeDesc(template.replace("$(JOB_COMPLETION_INDEX)", str(i)), random.randint(1, 4_000_000), 0)
                  for i in range(workers)]
        random.shuffle(nodes)
        assert sorted(nodes)[0].addr == f"{NAME}-0.{NAME}", workers


def test_only_node_0_gets_the_pipes_environment_and_there_only_global_rank_0_reports(spec, monkeypatch):
    pipes_env = {"DAGSTER_PIPES_CONTEXT": "context-payload", "DAGSTER_PIPES_MESSAGES": "messages-payload"}
    # Node 0's pod as PipesK8sClient builds it from our base spec and its session's variables.
    pod = build_pod_body(pod_name="dagster-run-pod", image=None, command=None, env_vars=pipes_env,
                         base_pod_meta=spec.node0_meta, base_pod_spec=spec.node0_spec)
    trainer = pod.spec.containers[0]
    assert {e.name: e.value for e in trainer.env}.items() >= pipes_env.items()
    assert trainer.command == node0_command(spec) and pod.spec.hostname == f"{NAME}-0"
    assert pod.metadata.labels[TRAINING_LABEL] == NAME
    worker_env = spec.workers_job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not [e for e in worker_env if e["name"].startswith("DAGSTER_PIPES")]
    # Within node 0, the other local ranks see the variables but stay silent.
    monkeypatch.setenv("DAGSTER_PIPES_CONTEXT", "context-payload")
    monkeypatch.setenv("RANK", "0")
    assert launched_through_pipes()
    monkeypatch.setenv("RANK", "3")
    assert not launched_through_pipes()


def test_the_objects_are_valid_kubernetes_api_objects(spec):
    as_model(kubernetes.client.V1Service, spec.service)
    as_model(kubernetes.client.V1Job, spec.workers_job)
    as_model(kubernetes.client.V1PodSpec, spec.node0_spec)
    with pytest.raises(Exception, match="Unexpected keys"):  # the check does look inside
        as_model(kubernetes.client.V1Job, {**spec.workers_job, "spec": {**spec.workers_job["spec"], "replicas": 3}})
    for pod_spec in (spec.node0_spec, spec.workers_job["spec"]["template"]["spec"]):
        mounts = {m["name"]: m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]}
        assert mounts == {"artifacts": "/artifacts", "dshm": "/dev/shm"}  # same paths as the Dagster run's
        claim = next(v for v in pod_spec["volumes"] if v["name"] == "artifacts")["persistentVolumeClaim"]
        assert claim == {"claimName": "artifacts"}
        assert pod_spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}


def test_bad_requests_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="nnodes=1: one node trains with a local torchrun"):
        training_job_spec(SETTINGS, TorchrunConfig(nnodes=1), "nanogpt_core.train", ARGS, name=NAME)
    with pytest.raises(ValueError, match="rdzv_endpoint='head:29400' was given, but on Kubernetes"):
        training_job_spec(SETTINGS, TorchrunConfig(nnodes=2, rdzv_endpoint="head:29400"), "nanogpt_core.train",
                          ARGS, name=NAME)
    with pytest.raises(ValueError, match="must be a DNS label"):
        training_job_spec(SETTINGS, TorchrunConfig(nnodes=2), "nanogpt_core.train", ARGS, name="Bad_Name")


def test_a_training_name_is_a_short_dns_label_from_the_asset_and_run():
    name = training_name("1A2B3C4D-5e6f-7a8b-9c0d-0123456789ab", "finetuned_checkpoint")
    assert name == "finetuned-checkpoint-1a2b3c4d"
    long_name = training_name("1a2b3c4d-0000", "a_very_long_asset_name_" * 4)
    assert len(long_name) <= 40 and long_name.endswith("-1a2b3c4d")


def test_the_command_line_prints_the_three_objects_for_kubectl():
    out = io.StringIO()
    with redirect_stdout(out):
        main(["--image", "img:1", "--artifacts-claim", "artifacts", "--artifacts-path", "/artifacts",
              "--nnodes", "2", "--nproc-per-node", "4", "--", "--profile", "gpt2-124m"])
    documents = list(yaml.safe_load_all(out.getvalue()))
    assert [d["kind"] for d in documents] == ["Service", "Pod", "Job"]
    as_model(kubernetes.client.V1Pod, documents[1])
    assert documents[1]["spec"]["containers"][0]["command"][-2:] == ["--profile", "gpt2-124m"]


def test_the_cluster_settings_come_from_the_environment_and_are_off_without_an_image(tmp_path):
    assert cluster_from_env({}) is None
    with pytest.raises(ValueError, match="NANOGPT_K8S_ARTIFACTS_CLAIM is not"):
        cluster_from_env({"NANOGPT_K8S_IMAGE": "img:1"})
    cluster = cluster_from_env({"NANOGPT_K8S_IMAGE": "img:1", "NANOGPT_K8S_ARTIFACTS_CLAIM": "artifacts",
                                "NANOGPT_K8S_NAMESPACE": "ml", "NANOGPT_ARTIFACTS": str(tmp_path / "art")})
    assert (cluster.image, cluster.namespace, cluster.artifacts_claim) == ("img:1", "ml", "artifacts")
    assert cluster.artifacts_path == str(tmp_path / "art")  # the trainer's paths are the run's paths


def test_with_a_cluster_configured_a_multi_node_training_is_sent_to_kubernetes(monkeypatch, tmp_path):
    """The training assets' launch takes the Kubernetes path; with no cluster reachable here, the
    Kubernetes client's own complaint about its configuration is what comes back."""
    from pipeline.assets.training import launch_training
    from pipeline.torchrun import TrainingConfig

    monkeypatch.setenv("NANOGPT_K8S_IMAGE", "img:1")
    monkeypatch.setenv("NANOGPT_K8S_ARTIFACTS_CLAIM", "artifacts")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    @dg.asset
    def two_node_training(context):  # unannotated: a postponed annotation hides the type from Dagster
        launch_training(context, TrainingConfig(profile="micro", nnodes=2), None, "nanogpt_core.train", [])

    with dg.instance_for_test() as instance:
        result = dg.materialize([two_node_training], instance=instance, raise_on_error=False)
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "kube-config" in str(failure.event_specific_data.error), failure.event_specific_data.error

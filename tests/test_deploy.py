"""deploy/: the manifests parse and agree with each other and with the code (ports, paths, probes)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import cli
from proxy.app import create_app
from proxy.config import RESERVED_PATHS, load_dir
from proxy.routes import RouteTable

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"


Docs = dict[tuple[str, str], dict[str, Any]]


def _docs() -> Docs:
    """Every document of every manifest, by (kind, name): two Services (the proxy's and the
    store's) are two entries, and a name used twice for one kind fails here."""
    out: Docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and {"apiVersion", "kind"} <= doc.keys(), path
            key = (doc["kind"], doc.get("metadata", {}).get("name", ""))
            assert key not in out, f"{path.name}: {key} is defined twice"
            out[key] = doc
    return out


@pytest.fixture(scope="module")
def docs() -> Docs:
    return _docs()


def _container(docs: Docs) -> dict[str, Any]:
    (container,) = docs["Deployment", "llmproxy"]["spec"]["template"]["spec"]["containers"]
    return container


def _args(container: dict[str, Any]) -> dict[str, str | bool]:
    """`--name=value` / `--name value` / `--flag` -> {name: value or True}."""
    out: dict[str, str | bool] = {}
    args = list(container["args"])
    assert args[0] == "serve"
    i = 1
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if eq:
            out[name] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[name] = args[i + 1]
            i += 1
        else:
            out[name] = True
        i += 1
    return out


def test_every_manifest_parses_and_kustomize_lists_them(docs):
    assert {("ConfigMap", "llmproxy-routes"), ("Deployment", "llmproxy"), ("Service", "llmproxy"),
            ("HorizontalPodAutoscaler", "llmproxy"), ("PodDisruptionBudget", "llmproxy"), ("Kustomization", ""),
            ("StatefulSet", "llmproxy-state"), ("Service", "llmproxy-state")} <= set(docs)
    listed = set(docs["Kustomization", ""]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_probes_and_scrape_use_the_proxys_own_endpoints(docs):
    container = _container(docs)
    served = {r.path for r in create_app(RouteTable([])).litestar.routes}
    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["path"] in served and probe["path"] in RESERVED_PATHS
        assert probe["port"] == "http"
    annotations = docs["Deployment", "llmproxy"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in served


def test_ports_agree_from_the_dockerfile_to_the_service(docs):
    container = _container(docs)
    args = _args(container)
    (port,) = container["ports"]
    assert port["name"] == "http" and int(args["--port"]) == port["containerPort"]
    assert args["--host"] == "0.0.0.0"  # reachable from the kubelet and the Service, not only loopback
    annotations = docs["Deployment", "llmproxy"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    (svc_port,) = docs["Service", "llmproxy"]["spec"]["ports"]
    assert svc_port["targetPort"] in ("http", port["containerPort"])
    pod_labels = docs["Deployment", "llmproxy"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service", "llmproxy"]["spec"]["selector"].items() <= pod_labels.items()
    assert docs["Deployment", "llmproxy"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (exposed,) = re.findall(r"^EXPOSE (\d+)$", dockerfile, re.M)
    assert int(exposed) == port["containerPort"]
    (cmd,) = re.findall(r"^CMD (\[.*\])$", dockerfile, re.M)
    cmd_args = yaml.safe_load(cmd)  # a JSON array
    assert cmd_args[0] == "serve" and cmd_args[cmd_args.index("--port") + 1] == exposed
    assert "--reload" in cmd_args
    assert "/healthz" in re.search(r"^HEALTHCHECK .*(?:\n .*)*", dockerfile, re.M).group(0)  # type: ignore[union-attr]
    assert re.search(r'^ENTRYPOINT \["llmproxy"\]$', dockerfile, re.M)


def test_the_routes_configmap_is_mounted_whole_and_reloaded(docs):
    container = _container(docs)
    args = _args(container)
    assert args.get("--reload") is True
    spec = docs["Deployment", "llmproxy"]["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == docs["ConfigMap", "llmproxy-routes"]["metadata"]["name"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == args["--routes"]
    assert "subPath" not in mount  # subPath mounts never see ConfigMap updates


def test_clients_need_a_key_from_a_secret_mounted_whole(docs):
    container = _container(docs)
    args = _args(container)
    assert args.get("--host") == "0.0.0.0" and isinstance(args.get("--keys"), str)  # bound wide: keys on
    spec = docs["Deployment", "llmproxy"]["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "secret" in v and v["name"] == "keys"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert str(args["--keys"]).startswith(mount["mountPath"] + "/")
    assert "subPath" not in mount  # subPath mounts never see Secret updates
    file = str(args["--keys"]).rsplit("/", 1)[1]
    create = f"kubectl create secret generic {volume['secret']['secretName']} --from-file={file}="
    assert create in (DEPLOY / "README.md").read_text()


def test_several_workers_have_a_writable_tmp_for_metrics(docs):
    container = _container(docs)
    if int(_args(container).get("--workers", 1)) > 1 and container["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_the_hpa_and_pdb_target_the_deployment(docs):
    name = docs["Deployment", "llmproxy"]["metadata"]["name"]
    target = docs["HorizontalPodAutoscaler", "llmproxy"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", name)
    assert "resources" in _container(docs) and _container(docs)["resources"]["requests"]["cpu"]  # HPA on CPU needs it
    pod_labels = docs["Deployment", "llmproxy"]["spec"]["template"]["metadata"]["labels"]
    assert docs["PodDisruptionBudget", "llmproxy"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_configmap_routes_load_as_a_pod_would_see_them(docs, tmp_path, monkeypatch):
    """Lay the ConfigMap out as the kubelet does (`..data` symlink) and load it with the pod's environment."""
    data: dict[str, str] = docs["ConfigMap", "llmproxy-routes"]["data"]
    assert data and all(key.endswith((".yaml", ".yml")) for key in data)
    stamp = tmp_path / "..2025_01_01_00_00_00.000000001"
    stamp.mkdir()
    for key, text in data.items():
        (stamp / key).write_text(text)
    (tmp_path / "..data").symlink_to(stamp.name)
    for key in data:
        (tmp_path / key).symlink_to(Path("..data") / key)

    env = {e["name"]: e.get("value", "") for e in _container(docs)["env"]}
    needed = {m.group(1) for text in data.values() for m in re.finditer(r"\$\{([A-Za-z_]\w*)\}", text)}
    assert needed <= env.keys(), "every ${VAR} without a default must be set in the Deployment"
    monkeypatch.delenv("QWEN_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    routes = load_dir(tmp_path)
    assert sorted(r.source.rsplit(os.sep, 1)[1] for r in routes) == sorted(data)
    assert all("10.103.232.66" not in u for r in routes for u in r.upstreams)


def test_the_readme_commands_name_real_files(docs):
    text = (DEPLOY / "README.md").read_text()
    assert "docker build -f deploy/Dockerfile" in text and (DEPLOY / "Dockerfile").is_file()
    assert "kubectl apply -k deploy/k8s" in text
    updates = [line.strip() for line in text.splitlines() if line.strip().startswith("kubectl create configmap")]
    assert updates
    for line in updates:
        words = shlex.split(line.split("|")[0])
        assert words[3] == docs["ConfigMap", "llmproxy-routes"]["metadata"]["name"]  # the ConfigMap the Deployment mounts
        # The shipped routes.d/ carries the ${QWEN_BASE_URL:-<seed address>} default the ConfigMap removed.
        assert "--from-file=routes.d/" not in words and "--from-file=routes.d" not in words, line
    assert "--from-file=routes.d" not in (K8S / "configmap.yaml").read_text()
    docker_runs = [line for line in text.splitlines() if line.strip().startswith("docker run")]
    assert docker_runs and all("host.docker.internal:host-gateway" in line for line in docker_runs)


def _image_user() -> tuple[int, int | None]:
    """The Dockerfile's `USER uid[:gid]` and, without a gid there, the gid `groupadd`/`useradd` gave it."""
    text = (DEPLOY / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER\s+(\S+)", text, re.M)
    uid, _, gid = user.partition(":")
    if gid:
        return int(uid), int(gid)
    m = re.search(r"--gid\s+(\d+)", text)
    return int(uid), int(m.group(1)) if m else None  # None: a system gid chosen at build time


# The user each workload's image runs as, when its manifest does not say: ours from deploy/Dockerfile;
# Valkey's from docker-library's valkey alpine Dockerfile (`addgroup -S -g 1000 valkey;
# adduser -S -G valkey -u 999 valkey`).
VALKEY_USER = (999, 1000)


def _workloads(docs: Docs) -> list[tuple[str, dict[str, Any], dict[str, Any], tuple[int, int | None]]]:
    """(label, pod spec, container, the image's uid and gid) for every container of every workload."""
    images = {"Deployment": _image_user(), "StatefulSet": VALKEY_USER}
    return [(f"{kind}/{name}/{c['name']}", doc["spec"]["template"]["spec"], c, images[kind])
            for (kind, name), doc in docs.items() if kind in images
            for c in doc["spec"]["template"]["spec"]["containers"]]


def _readable_mounts(pod: dict[str, Any], container: dict[str, Any], image_user: tuple[int, int | None]) -> list[str]:
    """The mount paths of the container's volumes whose files its process can read; fails on one it cannot.

    Secret and ConfigMap volumes are owned by root, group root unless the pod sets `fsGroup`
    (then group fsGroup, with group read added: kubelet `SetVolumeOwnership`), mode `defaultMode`
    (0644 when unset). The process runs as runAsUser, with runAsGroup (else the image's group),
    fsGroup and supplementalGroups as its groups; every such file must be readable to it."""
    ctx = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    image_uid, image_gid = image_user
    uid = ctx.get("runAsUser", image_uid)
    assert uid == image_uid, "runAsUser is the image's user (its files, its HOME)"
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    groups = {ctx.get("runAsGroup", image_gid), fs_group, *pod.get("securityContext", {}).get("supplementalGroups", [])}
    volumes = {v["name"]: v for v in pod["volumes"]}
    checked = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        source = volume.get("secret") or volume.get("configMap")
        if source is None:
            assert "emptyDir" in volume, mount  # emptyDir is 0777: writable by anyone
            checked.append(mount["mountPath"])
            continue
        mode = source.get("defaultMode", 0o644)
        for item in source.get("items", []):
            mode |= item.get("mode", 0)
        gid = 0
        if fs_group is not None:
            gid, mode = fs_group, mode | 0o440
        readable = uid == 0 or bool(mode & 0o004) or (gid in groups and bool(mode & 0o040))
        assert readable, (f"volume {mount['name']!r} at {mount['mountPath']}: files root:{gid} mode {mode:o} are not "
                          f"readable by uid {uid} with groups {sorted(g for g in groups if g is not None)}; set fsGroup")
        checked.append(mount["mountPath"])
    return checked


def test_the_container_user_can_read_every_file_mounted_for_it(docs):
    for label, pod, container, image_user in _workloads(docs):
        checked = _readable_mounts(pod, container, image_user)
        assert container["securityContext"].get("readOnlyRootFilesystem") is True, label
        assert checked, f"{label}: a read-only root needs a volume for what the process writes or reads"
    checked = _readable_mounts(docs["Deployment", "llmproxy"]["spec"]["template"]["spec"], _container(docs), _image_user())
    args = _args(_container(docs))
    needed = [str(args["--routes"]), str(Path(str(args["--keys"])).parent)]
    assert set(needed) <= set(checked), "the routes folder and the keys file are mounted volumes"


def test_the_keys_file_is_readable_only_by_the_process_in_a_pod_without_fsgroup_it_would_not_be(docs):
    """Issue 21 item 3, the other way round: the shipped 0440 Secret without `fsGroup` is refused."""
    pod = docs["Deployment", "llmproxy"]["spec"]["template"]["spec"]
    without = {**pod, "securityContext": {k: v for k, v in pod["securityContext"].items() if k != "fsGroup"}}
    with pytest.raises(AssertionError, match="set fsGroup"):
        _readable_mounts(without, _container(docs), _image_user())


def test_every_workload_runs_unprivileged_with_probes_on_its_own_ports(docs):
    """The proxy and the state store alike: non-root, no privilege escalation, no capabilities,
    seccomp on, and a readiness and a liveness probe on a port the container declares."""
    labels = []
    for label, pod, container, image_user in _workloads(docs):
        labels.append(label)
        ctx = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", image_user[0]) != 0, label
        assert (ctx.get("runAsUser"), ctx.get("runAsGroup", image_user[1])) == image_user, f"{label}: the image's user"
        assert ctx.get("allowPrivilegeEscalation") is False, label
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], label
        assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", label
        ports = {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in container, f"{label}: no {probe}"
            (how,) = [v for k, v in container[probe].items() if k in ("httpGet", "tcpSocket", "exec", "grpc")]
            assert "command" in how or how["port"] in ports, f"{label}: {probe} on a port it does not declare"
        assert "resources" in container and container["resources"]["limits"]["memory"], label
    assert {"Deployment/llmproxy/llmproxy", "StatefulSet/llmproxy-state/valkey"} <= set(labels)


def test_every_service_selects_a_workload_and_targets_a_declared_port(docs):
    pods = {name: doc["spec"]["template"] for (kind, name), doc in docs.items() if kind in ("Deployment", "StatefulSet")}
    services = [(name, doc) for (kind, name), doc in docs.items() if kind == "Service"]
    assert {name for name, _ in services} == {"llmproxy", "llmproxy-state"}
    for name, svc in services:
        matched = [t for t in pods.values() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} workloads"
        declared = {p.get(k) for c in matched[0]["spec"]["containers"] for p in c["ports"] for k in ("name", "containerPort")}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in declared, f"Service {name}: targetPort {port['targetPort']} is no container port"
    (sts,) = [doc for (kind, _), doc in docs.items() if kind == "StatefulSet"]
    assert sts["spec"]["serviceName"] in {name for name, _ in services}


def test_every_secret_a_pod_reads_is_created_by_the_readme_with_that_key(docs):
    """A secretKeyRef to a key the operator never made leaves the pod in CreateContainerConfigError."""
    readme = (DEPLOY / "README.md").read_text().replace("\\\n", " ")
    made: dict[str, set[str]] = {}
    for line in readme.splitlines():
        m = re.search(r"kubectl create secret generic (\S+)(.*)", line)
        if m:
            made.setdefault(m.group(1), set()).update(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", m.group(2)))
    refs = []
    for label, pod, container, _ in _workloads(docs):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], ref["key"]))
                assert ref["key"] in made.get(ref["name"], set()), f"{label}: {env['name']} reads {ref}, never created"
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in made, f"{label}: Secret {volume['secret']['secretName']}"
    assert ("llmproxy-state", "url") in refs and ("llmproxy-state", "password") in refs


def test_the_shipped_manifests_carry_no_private_default_address():
    """The seed deployment's private server stays out of deploy/: a pod without QWEN_BASE_URL fails."""
    for path in [*K8S.glob("*.yaml"), DEPLOY / "README.md", DEPLOY / "Dockerfile"]:
        assert "10.103.232.66" not in path.read_text(), path


def test_a_shared_state_store_runs_beside_the_replicas_with_its_url_from_a_secret(docs):
    """Issue 23: the replicas share limits through a Valkey (redis.yaml), its URL and password from a Secret."""
    store = {d["kind"]: d for d in yaml.safe_load_all((K8S / "redis.yaml").read_text())}
    assert "redis.yaml" in (K8S / "kustomization.yaml").read_text()
    env = {e["name"]: e for e in _container(docs)["env"]}
    ref = env["LLMPROXY_STATE"]["valueFrom"]["secretKeyRef"]
    (valkey,) = store["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    password = valkey["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == password["name"] == "llmproxy-state" and "optional" not in ref
    assert "$(VALKEY_PASSWORD)" in valkey["args"]  # the password is the Secret's, never in a manifest
    service = store["Service"]
    assert service["spec"]["selector"] == store["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    url = f"redis://:$PASSWORD@{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    assert url in (DEPLOY / "README.md").read_text()  # the README's command makes the URL the Service serves


def test_the_pod_leaves_the_service_before_sigterm_and_drains_within_the_grace_period(docs):
    """uvicorn closes its listener first thing on SIGTERM (uvicorn/server.py `Server.shutdown`), so
    readiness cannot fail *before* it: the preStop sleep is what keeps the pod serving while the
    endpoint removal spreads. The kubelet's countdown starts with preStop, so sleep + drain must fit."""
    pod = docs["Deployment", "llmproxy"]["spec"]["template"]["spec"]
    container = _container(docs)
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # the native sleep action (Kubernetes 1.30+)
        pause = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        pause = float(command[1])
        base = re.search(r"^FROM (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)  # type: ignore[union-attr]
        assert "slim" in base and "distroless" not in base, "the image must carry a `sleep` binary"
    assert pause >= 5, "kube-proxy and ingresses need seconds to drop an endpoint"
    drain = float(_args(container).get("--grace-period", cli._parser().parse_args(["serve"]).grace_period))
    assert pause + drain + 5 <= pod["terminationGracePeriodSeconds"], "the kubelet would SIGKILL running streams"
    text = (DEPLOY / "README.md").read_text()
    assert f"`sleep {pause:g}`" in text and f"terminationGracePeriodSeconds: {pod['terminationGracePeriodSeconds']}" in text

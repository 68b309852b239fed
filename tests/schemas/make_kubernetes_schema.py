"""Write ``kubernetes-v1.30.json``: the strict JSON schemas of the Kubernetes kinds our manifests use.

The source is the ``kubernetes-validate`` wheel from PyPI, which ships the Kubernetes OpenAPI
definitions as JSON schemas (draft 2020-12) for each release; its ``-strict`` variant forbids
unknown fields, so a misspelt key fails validation. This keeps only the kinds listed below and
the definitions they reach, without descriptions, so the tests validate offline with a small file:

    python -m pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    unzip -q /tmp/kv/kubernetes_validate-*.whl -d /tmp/kv/pkg
    python tests/schemas/make_kubernetes_schema.py \\
        /tmp/kv/pkg/kubernetes_validate/kubernetes-json-schema/v1.30.0-local-strict/_definitions.json

1.30 is the oldest Kubernetes release the manifests are checked against: a field newer than that
is rejected, so they apply to any cluster from 1.30 on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

VERSION = "v1.30"
OUT = Path(__file__).with_name(f"kubernetes-{VERSION}.json")
DEFS = "#/$defs/"

#: (apiVersion, kind) -> definition name; PodTemplateSpec is what the KubeRay schema refers to
KINDS = {
    "v1/ConfigMap": "io.k8s.api.core.v1.ConfigMap",
    "v1/Secret": "io.k8s.api.core.v1.Secret",
    "v1/Service": "io.k8s.api.core.v1.Service",
    "v1/PersistentVolumeClaim": "io.k8s.api.core.v1.PersistentVolumeClaim",
    "apps/v1/Deployment": "io.k8s.api.apps.v1.Deployment",
    "apps/v1/StatefulSet": "io.k8s.api.apps.v1.StatefulSet",
    "batch/v1/Job": "io.k8s.api.batch.v1.Job",
}
EXTRA = ["io.k8s.api.core.v1.PodTemplateSpec", "io.k8s.api.core.v1.ResourceRequirements"]
DROP = ("description", "x-kubernetes-group-version-kind", "x-kubernetes-list-map-keys",
        "x-kubernetes-list-type", "x-kubernetes-map-type", "x-kubernetes-patch-merge-key",
        "x-kubernetes-patch-strategy", "x-kubernetes-unions", "format")


def _strip(node: Any, refs: set[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in DROP:
                continue
            if key == "$ref":
                refs.add(value.split(DEFS, 1)[1])
            # "properties" maps field names to schemas: a field called "description" or "format"
            # must stay, so only schema keywords are dropped, never property names
            out[key] = ({k: _strip(v, refs) for k, v in value.items()} if key == "properties"
                        else _strip(value, refs))
        return out
    if isinstance(node, list):
        return [_strip(item, refs) for item in node]
    return node


def main(definitions: Path) -> None:
    source = json.loads(definitions.read_text())["$defs"]
    wanted = [*KINDS.values(), *EXTRA]
    kept: dict[str, Any] = {}
    while wanted:
        name = wanted.pop()
        if name in kept:
            continue
        refs: set[str] = set()
        kept[name] = _strip(source[name], refs)
        wanted.extend(sorted(refs - kept.keys()))
    bundle = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://ssd-ray.invalid/schemas/kubernetes-{VERSION}.json",
        "description": f"Kubernetes {VERSION} strict schemas (from kubernetes-validate), trimmed by "
                       "tests/schemas/make_kubernetes_schema.py",
        "x-kinds": KINDS,
        "$defs": dict(sorted(kept.items())),
    }
    OUT.write_text(json.dumps(bundle, indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({len(kept)} definitions, {OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

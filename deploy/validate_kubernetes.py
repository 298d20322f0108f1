#!/usr/bin/env python3
"""Render the Kubernetes manifests (deploy/kubernetes) with kustomize and validate every object against the
Kubernetes API schemas, offline, without a cluster.

    .venv/bin/python deploy/validate_kubernetes.py [--kubernetes-version 1.32] [-v]

What is rendered (``kubectl kustomize``, kustomize v5): the base (CPU consumers), the gpu overlay, and the base
with the shared-store component. Each object is checked with PyPI's ``kubernetes-validate`` in strict mode
(unknown fields are errors) for the given Kubernetes version. The objects of custom resources, which those
schemas do not hold, are listed as not validated: KEDA's ``ScaledObject`` (keda.sh/v1alpha1) and the Prometheus
Operator's ``ServiceMonitor`` (monitoring.coreos.com/v1); tests/test_deployment.py checks the fields of theirs
that erc-stream relies on.

Exits 1 on an invalid object, 2 when kubectl or kubernetes-validate is missing. ``render`` is used by
tests/test_deployment.py too.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent / "kubernetes"
#: The custom resources in the manifests: (apiVersion group, kind) -> what installs their definition.
CUSTOM_RESOURCES = {
    ("keda.sh", "ScaledObject"): "KEDA 2.x",
    ("monitoring.coreos.com", "ServiceMonitor"): "the Prometheus Operator",
}

#: The built-in kinds the manifests use; any other kind must be added here or to CUSTOM_RESOURCES.
BUILT_IN_KINDS = frozenset({"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "PersistentVolumeClaim"})


def _kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl (with its built-in kustomize) is needed to render the manifests")
    out = subprocess.run([kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render(variant: str) -> list[dict]:
    """The objects of one variant: ``base``, ``gpu`` (overlays/gpu) or ``shared-store`` (base + the component)."""
    if variant == "base":
        return _kustomize(ROOT / "base")
    if variant == "gpu":
        return _kustomize(ROOT / "overlays" / "gpu")
    if variant == "shared-store":
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            (Path(tmp) / "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                "resources: [../base]\ncomponents: [../components/shared-store]\n")
            return _kustomize(Path(tmp))
    raise ValueError(f"unknown variant {variant!r}")


VARIANTS = ("base", "gpu", "shared-store")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubernetes-version", default="1.32", help="Kubernetes API version to validate against")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    try:
        import kubernetes_validate
    except ImportError:
        print("kubernetes-validate is not installed (pip install kubernetes-validate)", file=sys.stderr)
        return 2
    errors = 0
    not_validated: set[str] = set()
    for variant in VARIANTS:
        try:
            objects = render(variant)
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 2
        except subprocess.CalledProcessError as e:
            print(f"{variant}: kustomize failed: {e.stderr.strip()}", file=sys.stderr)
            return 1
        for obj in objects:
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
            if (group, obj["kind"]) in CUSTOM_RESOURCES:
                not_validated.add(f"{obj['apiVersion']} {name} (a custom resource of "
                                  f"{CUSTOM_RESOURCES[(group, obj['kind'])]})")
                continue
            try:
                kubernetes_validate.validate(obj, args.kubernetes_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors += 1
                print(f"{variant}: {name}: {e.message} at {'.'.join(str(p) for p in e.path)}", file=sys.stderr)
            else:
                if args.verbose:
                    print(f"{variant}: {name}: valid")
            if obj["kind"] not in BUILT_IN_KINDS:
                errors += 1
                print(f"{variant}: {name}: a kind this check does not know; add it here or to CUSTOM_RESOURCES",
                      file=sys.stderr)
        print(f"{variant}: {len(objects)} objects rendered")
    for line in sorted(not_validated):
        print(f"not validated (no schema offline): {line}")
    print(f"kubernetes manifests: {'ok' if not errors else f'{errors} errors'} (Kubernetes {args.kubernetes_version}, "
          f"strict)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Renders a kustomization the way `kustomize build` does, for exactly the subset daemonset/ and its components use.

scripts/validate-manifests.sh uses this when no kubectl with a components-aware kustomize (>= v3.7) is on PATH:
Debian's kubernetes-client is kubectl 1.20 with kustomize v2.0.3, which does not know `kind: Component`. When a
modern kubectl is there, it stays authoritative and the script checks that this renderer agrees with it.

Supported, and nothing else (anything outside fails with the file and the field named, so that a future component
is refused instead of silently rendered wrong):
  Kustomization (kustomize.config.k8s.io/v1beta1): resources (files in its dir, or dirs with a kustomization),
    namespace (on the kinds in NAMESPACED; CLUSTER_SCOPED kinds are left alone), components.
  Component (kustomize.config.k8s.io/v1alpha1): components (nested, applied before its own patches), patches.
  patches[]: `patch` inline, with `target` {kind, name}:
    - a strategic-merge patch of the same kind and name: maps merge; lists merge only where LIST_FIELDS says
      (by their merge key, items with `$patch: delete` removed) or are replaced where it says so;
    - a JSON6902 patch: only `op: add` appending to a list (`/a/b/-`).
  patches[] without `target`: only a whole-object `$patch: delete` (apiVersion, kind, metadata.name).
Targets must match at least one object (kustomize would silently patch nothing).

  scripts/kustomize-subset.py DIR     # multi-document YAML on stdout, exit 1 with the reason on stderr
"""
import copy
import os
import sys

import yaml

NAMESPACED = {"ServiceAccount", "ConfigMap", "DaemonSet", "Role", "RoleBinding"}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}

# Strategic-merge semantics of every list a patch may touch, by path ("[]" = any item of a list), as the
# Kubernetes API declares them (patchStrategy=merge, patchMergeKey) or, for lists without a strategy, "replace".
LIST_FIELDS = {
    ("DaemonSet", ("spec", "template", "spec", "containers")): ("merge", "name"),
    ("DaemonSet", ("spec", "template", "spec", "containers", "[]", "volumeMounts")): ("merge", "mountPath"),
    ("DaemonSet", ("spec", "template", "spec", "volumes")): ("merge", "name"),
    ("DaemonSet", ("spec", "template", "spec", "containers", "[]", "securityContext", "capabilities", "add")):
        ("replace", None),
    ("DaemonSet", ("spec", "template", "spec", "containers", "[]", "securityContext", "capabilities", "drop")):
        ("replace", None),
}


class Refused(Exception):
    pass


def refuse(where, field, what):
    raise Refused(f"{where}: {field}: {what}")


def load_yaml_docs(path):
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise Refused(f"{path}: cannot read: {e}") from e


def kustomization_file(d):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    raise Refused(f"{d}: no kustomization.yaml")


def load_kustomization(d, kind):
    path = kustomization_file(d)
    docs = load_yaml_docs(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        refuse(path, "(document)", "expected one mapping")
    k = docs[0]
    api = {"Kustomization": "kustomize.config.k8s.io/v1beta1", "Component": "kustomize.config.k8s.io/v1alpha1"}[kind]
    if k.get("kind") != kind:
        refuse(path, "kind", f"{k.get('kind')!r}, expected {kind!r}")
    if k.get("apiVersion") != api:
        refuse(path, "apiVersion", f"{k.get('apiVersion')!r}, expected {api!r}")
    allowed = {"apiVersion", "kind", "components"} | (
        {"resources", "namespace"} if kind == "Kustomization" else {"patches"})
    for key in k:
        if key not in allowed:
            refuse(path, key, f"not supported in a {kind} by this renderer (supported: {', '.join(sorted(allowed))})")
    for key in ("resources", "components", "patches"):
        if key in k and not isinstance(k[key], list):
            refuse(path, key, "expected a list")
    return path, k


def obj_id(o):
    return (o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])


def describe(o):
    ns = o["metadata"].get("namespace")
    return f"{o['kind']} {ns + '/' if ns else ''}{o['metadata']['name']}"


def check_object(path, o):
    if not isinstance(o, dict):
        refuse(path, "(document)", "expected a mapping")
    for key in ("apiVersion", "kind"):
        if not isinstance(o.get(key), str):
            refuse(path, key, "missing")
    if not isinstance(o.get("metadata"), dict) or not isinstance(o["metadata"].get("name"), str):
        refuse(path, "metadata.name", "missing")
    if o["kind"] not in NAMESPACED | CLUSTER_SCOPED:
        refuse(path, "kind", f"{o['kind']!r}: scope unknown to this renderer (add it to NAMESPACED or CLUSTER_SCOPED)")
    if o["kind"] in CLUSTER_SCOPED and "namespace" in o["metadata"]:
        refuse(path, "metadata.namespace", f"on the cluster-scoped {o['kind']}")


def add_objects(acc, path, objs):
    ids = {obj_id(o) for o in acc}
    for o in objs:
        check_object(path, o)
        if obj_id(o) in ids:
            refuse(path, "(document)", f"{describe(o)} is defined twice")
        ids.add(obj_id(o))
        acc.append(o)


def set_namespace(path, ns, objs):
    if not isinstance(ns, str) or not ns:
        refuse(path, "namespace", "expected a non-empty string")
    for o in objs:
        if o["kind"] in NAMESPACED:
            o["metadata"]["namespace"] = ns
        # kustomize also rewrites ServiceAccount subjects of bindings, under rules this renderer does not
        # reimplement: accept only bindings that already name the target namespace.
        for i, s in enumerate(o.get("subjects") or []):
            if isinstance(s, dict) and s.get("kind") == "ServiceAccount" and s.get("namespace") != ns:
                refuse(path, "namespace",
                       f"{describe(o)} subjects[{i}] is in namespace {s.get('namespace')!r}, not {ns!r}: "
                       "kustomize's subject rewriting is not supported")


def build(d):
    """A Kustomization dir: its objects, with its namespace and components applied."""
    path, k = load_kustomization(d, "Kustomization")
    acc = []
    for i, r in enumerate(k.get("resources") or []):
        if not isinstance(r, str):
            refuse(path, f"resources[{i}]", "expected a path")
        p = os.path.normpath(os.path.join(d, r))
        if os.path.isdir(p):
            add_objects(acc, path, build(p))
        elif os.path.isfile(p):
            if os.path.relpath(p, d).startswith(".."):
                refuse(path, f"resources[{i}]", f"{r}: a file outside the kustomization's dir")
            add_objects(acc, p, load_yaml_docs(p))
        else:
            refuse(path, f"resources[{i}]", f"{r} does not exist")
    # kustomize: resources, then components, then this kustomization's own transformers (here: namespace).
    for i, c in enumerate(k.get("components") or []):
        if not isinstance(c, str):
            refuse(path, f"components[{i}]", "expected a path")
        apply_component(os.path.normpath(os.path.join(d, c)), acc)
    if "namespace" in k:
        set_namespace(path, k["namespace"], acc)
    return acc


def apply_component(d, acc):
    if not os.path.isdir(d):
        raise Refused(f"{d}: component dir does not exist")
    path, k = load_kustomization(d, "Component")
    for i, c in enumerate(k.get("components") or []):
        if not isinstance(c, str):
            refuse(path, f"components[{i}]", "expected a path")
        apply_component(os.path.normpath(os.path.join(d, c)), acc)
    for i, p in enumerate(k.get("patches") or []):
        apply_patch(path, f"patches[{i}]", p, acc)


def apply_patch(path, field, p, acc):
    if not isinstance(p, dict):
        refuse(path, field, "expected a mapping")
    for key in p:
        if key not in ("patch", "target"):
            refuse(path, f"{field}.{key}", "not supported (only an inline `patch` and a `target`)")
    if not isinstance(p.get("patch"), str):
        refuse(path, f"{field}.patch", "missing (an inline patch is required)")
    try:
        body = yaml.safe_load(p["patch"])
    except yaml.YAMLError as e:
        raise Refused(f"{path}: {field}.patch: not YAML: {e}") from e
    if "target" not in p:
        delete_object(path, field, body, acc)
        return
    t = p["target"]
    if not isinstance(t, dict) or set(t) != {"kind", "name"} or not all(isinstance(v, str) for v in t.values()):
        refuse(path, f"{field}.target", f"{t!r}: only a target of exactly `kind` and `name` is supported")
    targets = [o for o in acc if o["kind"] == t["kind"] and o["metadata"]["name"] == t["name"]]
    if not targets:
        refuse(path, f"{field}.target", f"{t['kind']} {t['name']} matches no object")
    for o in targets:
        if isinstance(body, list):
            json6902(path, f"{field}.patch", body, o)
        elif isinstance(body, dict):
            smp_object(path, f"{field}.patch", body, t, o)
        else:
            refuse(path, f"{field}.patch", "neither a strategic-merge patch (mapping) nor a JSON6902 patch (list)")


def delete_object(path, field, body, acc):
    if (not isinstance(body, dict) or body.get("$patch") != "delete"
            or set(body) != {"$patch", "apiVersion", "kind", "metadata"}
            or not isinstance(body["metadata"], dict) or set(body["metadata"]) - {"name", "namespace"}):
        refuse(path, field, "without a target only a whole-object `$patch: delete` (apiVersion, kind, "
                            "metadata.name[, metadata.namespace]) is supported")
    m = body["metadata"]
    hits = [o for o in acc if o["apiVersion"] == body["apiVersion"] and o["kind"] == body["kind"]
            and o["metadata"]["name"] == m.get("name")
            and ("namespace" not in m or o["metadata"].get("namespace") == m["namespace"])]
    if len(hits) != 1:
        refuse(path, field, f"$patch: delete of {body['kind']} {m.get('name')} matches {len(hits)} objects, not 1")
    acc.remove(hits[0])


def smp_object(path, field, body, target, o):
    for key in ("apiVersion", "kind"):
        if body.get(key) != o[key]:
            refuse(path, f"{field}.{key}", f"{body.get(key)!r} differs from the target's {o[key]!r}")
    m = body.get("metadata")
    if not isinstance(m, dict) or set(m) != {"name"} or m["name"] != target["name"]:
        refuse(path, f"{field}.metadata", "only `name`, equal to the target's, is supported")
    rest = {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")}
    merge_map(path, field, o["kind"], (), o, rest)


def show(at):
    """A patch path as people write it: spec.containers[0].volumeMounts."""
    return ".".join(at).replace(".[", "[")


def merge_map(path, field, kind, at, dst, src):
    for key, v in src.items():
        where = show(at + (key,))
        if not isinstance(key, str) or key.startswith("$"):
            refuse(path, f"{field}: {where}", "patch directives other than a list item's `$patch: delete` "
                                              "are not supported")
        if v is None:
            refuse(path, f"{field}: {where}", "null (field deletion) is not supported")
        if isinstance(v, dict):
            if key not in dst:
                dst[key] = {}
            if not isinstance(dst[key], dict):
                refuse(path, f"{field}: {where}", "a mapping patches a non-mapping")
            merge_map(path, field, kind, at + (key,), dst[key], v)
        elif isinstance(v, list):
            merge_list(path, field, kind, at + (key,), dst, key, v)
        else:
            if isinstance(dst.get(key), (dict, list)):
                refuse(path, f"{field}: {where}", "a scalar patches a mapping or list")
            dst[key] = v


def merge_list(path, field, kind, at, parent, key, src):
    where = show(at)
    rule = LIST_FIELDS.get((kind, tuple("[]" if a.startswith("[") else a for a in at)))
    if rule is None:
        refuse(path, f"{field}: {where}", f"a list of {kind} whose strategic-merge strategy this renderer does not "
                                          "know (add it to LIST_FIELDS)")
    strategy, mkey = rule
    if strategy == "replace":
        for i, item in enumerate(src):
            if isinstance(item, (dict, list)) or item is None:
                refuse(path, f"{field}: {where}[{i}]", "only scalars are supported in a replaced list")
        parent[key] = list(src)
        return
    dst = parent.setdefault(key, [])
    if not isinstance(dst, list):
        refuse(path, f"{field}: {where}", "a list patches a non-list")
    for j, d in enumerate(dst):
        if not isinstance(d, dict) or not isinstance(d.get(mkey), str):
            refuse(path, f"{field}: {where}", f"the target's item [{j}] has no merge key `{mkey}`")
        if [e[mkey] for e in dst].count(d[mkey]) > 1:
            refuse(path, f"{field}: {where}", f"the target has {mkey}={d[mkey]!r} more than once")
    # As kustomize orders the result: the patch's items (merged into the target's entry of the same key, or new)
    # in the patch's order, then the target's items the patch does not name, in their order.
    by_key = {d[mkey]: d for d in dst}
    named, merged = set(), []
    for i, item in enumerate(src):
        here = f"{field}: {where}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get(mkey), str):
            refuse(path, here, f"a list item without its merge key `{mkey}`")
        if item[mkey] in named:
            refuse(path, here, f"{mkey}={item[mkey]!r} is in the patch more than once")
        named.add(item[mkey])
        if "$patch" in item:
            if item["$patch"] != "delete" or set(item) != {mkey, "$patch"}:
                refuse(path, here, "only `$patch: delete` with the merge key alone is supported")
            if item[mkey] not in by_key:
                refuse(path, here, f"$patch: delete of {mkey}={item[mkey]!r}, which is not in the list")
            continue
        entry = by_key.get(item[mkey], {})
        merge_map(path, field, kind, at + (f"[{i}]",), entry, item)
        merged.append(entry)
    parent[key] = merged + [d for d in dst if d[mkey] not in named]


def json6902(path, field, ops, o):
    for i, op in enumerate(ops):
        here = f"{field}[{i}]"
        if not isinstance(op, dict) or set(op) != {"op", "path", "value"} or op["op"] != "add":
            refuse(path, here, "only `op: add` with `path` and `value` is supported")
        ptr = op["path"]
        if not isinstance(ptr, str) or not ptr.startswith("/") or not ptr.endswith("/-"):
            refuse(path, f"{here}.path", f"{ptr!r}: only appending to a list (`/a/b/-`) is supported")
        node = o
        for tok in ptr[1:-2].split("/"):
            if not tok or "~" in tok or tok.isdigit() or not isinstance(node, dict) or tok not in node:
                refuse(path, f"{here}.path", f"{ptr!r}: {tok!r} is not an existing mapping key of {describe(o)}")
            node = node[tok]
        if not isinstance(node, list):
            refuse(path, f"{here}.path", f"{ptr!r} is not a list in {describe(o)}")
        node.append(copy.deepcopy(op["value"]))


def main():
    if len(sys.argv) != 2:
        print("usage: kustomize-subset.py DIR", file=sys.stderr)
        return 2
    try:
        objs = build(sys.argv[1])
    except Refused as e:
        print(f"kustomize-subset.py: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objs, sys.stdout, sort_keys=False, default_flow_style=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

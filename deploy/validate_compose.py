#!/usr/bin/env python3
"""Check docker-compose.yml (alone, and with docker-compose.secure.yml merged over it) against the Compose
Specification's JSON schema, for every combination of profiles, without Docker.

    .venv/bin/python deploy/validate_compose.py [--schema PATH] [-v]

The schema is the one npm's dclint@3 ships (``.ci/node/node_modules/dclint/schemas/compose.schema.json`` after
``npm install --prefix .ci/node dclint@3``, as ``.ci/run`` does; ``--schema`` or ``$COMPOSE_SCHEMA`` name another).
Like ``docker compose config``, each file is interpolated (in an empty environment: ``${X:-default}`` takes its
default, a required ``${X:?msg}`` a placeholder, and the required variables are listed), the files are merged
(Compose's rules: mappings key by key, sequences appended, ``command``, ``entrypoint`` and ``healthcheck.test``
replaced), then for each set of enabled profiles the services that run are checked:

- the model validates against the schema (Draft 7);
- every ``depends_on`` target runs too, and has a healthcheck where the condition is ``service_healthy``;
- every named volume, secret and network a service uses is declared; every bind-mounted file exists;
- every published port binds 127.0.0.1 and no two running services publish the same host port (the consumer
  profiles gpu and cpu are alternatives: combinations with both are left out of this check only).

Prints what it checked and every error; exits 1 on an error, 2 when the schema file is missing. Needs PyYAML and
jsonschema. ``load_model`` and ``interpolate`` are used by tests/test_deployment.py too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = "docker-compose.yml"
SECURE = "docker-compose.secure.yml"
#: The file sets checked by default: the plain deployment and the secure one.
FILE_SETS: tuple[tuple[str, ...], ...] = ((BASE,), (BASE, SECURE))
SCHEMA_CANDIDATES = (".ci/node/node_modules/dclint/schemas/compose.schema.json",
                     "node_modules/dclint/schemas/compose.schema.json")
#: Profiles that are alternatives (the same role, the same published port): not enabled together.
EXCLUSIVE_PROFILES = (frozenset({"gpu", "cpu"}),)
#: Bind-mount sources that the deployment creates when they are missing (output directories).
CREATED_AT_RUN_TIME = frozenset({"./exports"})
#: The value a required variable (``${X:?msg}``) takes here.
PLACEHOLDER = "validate-compose-placeholder"
#: Sequences that a later file replaces instead of extending (Compose's merge rules).
REPLACED = frozenset({"command", "entrypoint", "test"})

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class InterpolationError(ValueError):
    pass


def find_schema(explicit: str | None = None) -> Path | None:
    """The compose schema: ``explicit``, ``$COMPOSE_SCHEMA``, or dclint's in .ci/node or node_modules."""
    for candidate in (explicit, os.environ.get("COMPOSE_SCHEMA"), *SCHEMA_CANDIDATES):
        if candidate:
            path = Path(candidate) if Path(candidate).is_absolute() else ROOT / candidate
            if path.is_file():
                return path
    return None


# -- interpolation -------------------------------------------------------------------------------------------

def _braced(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``${`` whose ``{`` is at ``start`` (nested ``${...}`` in defaults)."""
    depth, i = 0, start
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise InterpolationError(f"unclosed ${{ in {text!r}")


def interpolate_str(text: str, env: Mapping[str, str], required: set[str] | None = None) -> str:
    """Compose's interpolation of one string: ``$$``, ``$X``, ``${X}``, ``${X:-d}``, ``${X-d}``, ``${X:?e}``,
    ``${X?e}``, ``${X:+r}``, ``${X+r}``. A required variable missing from ``env`` takes PLACEHOLDER (and is
    added to ``required``)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "$":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            end = _braced(text, i + 1)
            body = text[i + 2:end]
            m = _NAME.match(body)
            if not m:
                raise InterpolationError(f"invalid interpolation ${{{body}}} in {text!r}")
            name, rest = m.group(), body[m.end():]
            value = env.get(name)
            if rest == "":
                out.append(value or "")
            elif rest[:2] in (":-", ":?", ":+") or rest[:1] in ("-", "?", "+"):
                colon = rest.startswith(":")
                op, arg = (rest[1], rest[2:]) if colon else (rest[0], rest[1:])
                missing = value is None or (colon and value == "")
                if op == "-":
                    out.append(interpolate_str(arg, env, required) if missing else value)
                elif op == "+":
                    out.append("" if missing else interpolate_str(arg, env, required))
                else:  # "?": required
                    if missing:
                        if required is not None:
                            required.add(name)
                        out.append(PLACEHOLDER)
                    else:
                        out.append(value)
            else:
                raise InterpolationError(f"invalid interpolation ${{{body}}} in {text!r}")
            i = end + 1
        else:
            m = _NAME.match(text, i + 1)
            if m:
                out.append(env.get(m.group(), ""))
                i = m.end()
            else:
                out.append("$")
                i += 1
    return "".join(out)


def interpolate(value: Any, env: Mapping[str, str] | None = None, required: set[str] | None = None) -> Any:
    """Interpolate every string value (not the keys) of a loaded compose file."""
    env = {} if env is None else env
    if isinstance(value, str):
        return interpolate_str(value, env, required)
    if isinstance(value, list):
        return [interpolate(v, env, required) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env, required) for k, v in value.items()}
    return value


# -- merging --------------------------------------------------------------------------------------------------

def _normalize_service(service: dict) -> dict:
    """List forms that Compose merges as mappings: environment, depends_on."""
    service = dict(service)
    env = service.get("environment")
    if isinstance(env, list):
        service["environment"] = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    deps = service.get("depends_on")
    if isinstance(deps, list):
        service["depends_on"] = {d: {"condition": "service_started"} for d in deps}
    return service


def _volume_target(volume: Any) -> Any:
    if isinstance(volume, dict):
        return volume.get("target")
    parts = str(volume).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _merge(base: Any, over: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for k, v in over.items():
            merged[k] = _merge(base[k], v, k) if k in base else v
        return merged
    if isinstance(base, list) and isinstance(over, list) and key not in REPLACED:
        if key == "volumes":  # unique by mount target: the later file's mount wins
            targets = {_volume_target(v) for v in over}
            return [v for v in base if _volume_target(v) not in targets] + list(over)
        return list(base) + [v for v in over if v not in base]
    return over


def merge(base: dict, override: dict) -> dict:
    """``override`` merged over ``base`` (Compose's rules for multiple -f files)."""
    base = dict(base)
    over = dict(override)
    for doc in (base, over):
        if isinstance(doc.get("services"), dict):
            doc["services"] = {n: _normalize_service(s or {}) for n, s in doc["services"].items()}
    return _merge(base, over)


def load_file(path: Path, env: Mapping[str, str] | None = None, required: set[str] | None = None) -> dict:
    """One compose file, anchors and ``<<`` merge keys resolved, interpolated."""
    return interpolate(yaml.safe_load(path.read_text()) or {}, env, required)


def load_model(files: Iterable[str | Path] = (BASE,), env: Mapping[str, str] | None = None,
               required: set[str] | None = None) -> dict:
    """The files, interpolated and merged in order (as ``docker compose -f a -f b config`` sees them)."""
    model: dict = {}
    for f in files:
        path = Path(f) if Path(f).is_absolute() else ROOT / f
        model = merge(model, load_file(path, env, required))
    return model


# -- checks ---------------------------------------------------------------------------------------------------

def profiles_of(model: dict) -> list[str]:
    return sorted({p for s in model.get("services", {}).values() for p in s.get("profiles", ())})


def active_services(model: dict, enabled: Iterable[str]) -> dict[str, dict]:
    """The services that run with these profiles enabled: those without profiles, and those with one of them."""
    enabled = set(enabled)
    return {n: s for n, s in model.get("services", {}).items()
            if not s.get("profiles") or enabled & set(s["profiles"])}


def _published(port: Any) -> tuple[str, str] | None:
    """(host IP, host port) of a published port, or None when it is not published on the host."""
    if isinstance(port, dict):
        if port.get("published") is None:
            return None
        return str(port.get("host_ip", "")), str(port["published"])
    text = str(port).split("/", 1)[0]
    if text.startswith("["):  # [::1]:8080:80
        host, _, rest = text[1:].partition("]:")
        return host, rest.split(":", 1)[0]
    parts = text.split(":")
    if len(parts) == 1:
        return None  # container port only: an ephemeral host port
    if len(parts) == 2:
        return "", parts[0]
    return parts[0], parts[1]


def check_services(model: dict, services: dict[str, dict], *, ports_exclusive: bool = True) -> list[str]:
    """The errors of the model restricted to ``services`` (those that run)."""
    errors: list[str] = []
    volumes = set(model.get("volumes") or {})
    secrets = set(model.get("secrets") or {})
    networks = set(model.get("networks") or {}) | {"default"}
    published: dict[tuple[str, str], str] = {}
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            spec = spec or {}
            if dep not in services:
                if spec.get("required", True):
                    errors.append(f"{name}: depends on {dep}, which does not run with these profiles")
                continue
            if spec.get("condition") == "service_healthy" and not services[dep].get("healthcheck"):
                errors.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source, kind = volume.get("source"), volume.get("type", "volume")
            else:
                source = str(volume).split(":", 1)[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if kind == "volume" and source and source not in volumes:
                errors.append(f"{name}: uses the volume {source}, which is not declared")
            if kind == "bind" and source and source.startswith(".") and source not in CREATED_AT_RUN_TIME:
                if not (ROOT / source).exists():
                    errors.append(f"{name}: bind-mounts {source}, which does not exist")
        for secret in service.get("secrets") or []:
            source = secret.get("source") if isinstance(secret, dict) else secret
            if source not in secrets:
                errors.append(f"{name}: uses the secret {source}, which is not declared")
        nets = service.get("networks") or {}
        for net in (nets if isinstance(nets, (list, dict)) else []):
            if net not in networks:
                errors.append(f"{name}: joins the network {net}, which is not declared")
        for port in service.get("ports") or []:
            pub = _published(port)
            if pub is None:
                continue
            host_ip, host_port = pub
            if host_ip not in ("127.0.0.1", "::1"):
                errors.append(f"{name}: publishes {port!r} on {host_ip or 'every interface'}, not 127.0.0.1")
            if ports_exclusive:
                other = published.setdefault((host_ip, host_port), name)
                if other != name:
                    errors.append(f"{name}: publishes host port {host_port}, as {other} does")
    return errors


def schema_errors(validator: Any, doc: dict) -> list[str]:
    out = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        out.append(f"schema: {where}: {e.message}")
    return out


def validate(schema_path: Path, file_sets: Iterable[tuple[str, ...]] = FILE_SETS,
             verbose: bool = False) -> tuple[list[str], list[str]]:
    """(report lines, errors) of every file set and profile combination."""
    from jsonschema import Draft7Validator

    schema = json.loads(schema_path.read_text())
    Draft7Validator.check_schema(schema)
    validator = Draft7Validator(schema)
    shown = schema_path.relative_to(ROOT) if schema_path.is_relative_to(ROOT) else schema_path
    report: list[str] = [f"schema: {shown}"]
    errors: list[str] = []
    files_seen: set[str] = set()
    for files in file_sets:
        required: set[str] = set()
        for f in files:  # each file on its own first, as Compose validates each before merging
            if f in files_seen:
                continue
            files_seen.add(f)
            file_errors = schema_errors(validator, load_file(ROOT / f))
            errors += [f"{f}: {e}" for e in file_errors]
            report.append(f"{f}: {'schema ok' if not file_errors else f'{len(file_errors)} schema errors'}")
        label = " + ".join(files)
        model = load_model(files, {}, required)
        profiles = profiles_of(model)
        combos = [frozenset(c) for r in range(len(profiles) + 1) for c in itertools.combinations(profiles, r)]
        set_errors: dict[str, list[frozenset[str]]] = {}
        for combo in combos:
            services = active_services(model, combo)
            filtered = {**model, "services": services}
            exclusive = not any(group <= combo for group in EXCLUSIVE_PROFILES)
            found = schema_errors(validator, filtered) + check_services(model, services, ports_exclusive=exclusive)
            for e in found:
                set_errors.setdefault(e, []).append(combo)
            if verbose:
                report.append(f"  [{','.join(sorted(combo)) or 'no profile'}] {len(services)} services: "
                              f"{'ok' if not found else f'{len(found)} errors'}")
        for e, where in set_errors.items():
            shown = ", ".join("[" + ",".join(sorted(c)) + "]" if c else "[no profile]" for c in where[:3])
            more = f" and {len(where) - 3} more" if len(where) > 3 else ""
            errors.append(f"{label}: {e} (profiles {shown}{more})")
        report.append(f"{label}: {len(combos)} profile combinations of {', '.join(profiles)}: "
                      f"{'ok' if not set_errors else f'{len(set_errors)} distinct errors'}")
        report.append(f"{label}: required variables: {', '.join(sorted(required)) or 'none'}")
    return report, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--schema", help="compose.schema.json (default: dclint's in .ci/node or node_modules)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per profile combination")
    args = parser.parse_args(argv)
    schema = find_schema(args.schema)
    if schema is None:
        print("validate_compose: no compose.schema.json: run `npm install --prefix .ci/node dclint@3` "
              "(or pass --schema)", file=sys.stderr)
        return 2
    report, errors = validate(schema, verbose=args.verbose)
    print("\n".join(report))
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    print(f"validate_compose: {'ok' if not errors else f'{len(errors)} errors'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

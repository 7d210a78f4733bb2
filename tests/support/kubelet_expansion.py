"""The kubelet's expansion of a container's command, args and env values, for the tests' own little
kubelets (``tests/support/runc.py``) and for checking what the pod spec carries.

Kubernetes (k8s.io/kubernetes third_party/forked/golang/expansion) rewrites ``$(NAME)`` to the value
of the variable NAME when it is defined (left as written otherwise) and ``$$`` to ``$``; any other
``$`` stays. Command and args see the container's whole env; an env value sees the variables
defined before it. A model of that, not the kubelet's code.
"""

from __future__ import annotations

from collections.abc import Mapping


def expand(value: str, env: Mapping[str, str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            if value[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if value[i + 1] == "(":
                end = value.find(")", i + 2)
                if end != -1 and value[i + 2 : end] in env:
                    out.append(env[value[i + 2 : end]])
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


def expand_env(entries: list[Mapping[str, str]], base: Mapping[str, str] = {}) -> dict[str, str]:
    """A container's ``env`` list as its process sees it: each value expanded with what came before."""
    env = dict(base)
    for entry in entries:
        env[entry["name"]] = expand(entry["value"], env)
    return env

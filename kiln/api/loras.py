"""LoRA adapters a request names -> :class:`~kiln.engine.request.LoraRef` (file checked and cached).

An adapter is named by an http(s) URL of a ``.safetensors`` file (render API ``loras[].url``,
WaveSpeed ``loras[].path``) or, where the dialect allows, by a Hugging Face repo id
(``owner/name``: the repository's one ``.safetensors`` file, or ``owner/name/file.safetensors``).
Downloads go through the image fetcher's checks (:func:`kiln.api.fetch.fetch_file`: public
addresses only, every redirect checked, one deadline, a size cap), land in the
:class:`~kiln.loras.LoraStore` by content hash and are judged by parsing (safetensors only). A URL
is downloaded once; later requests naming it use the cached file. A repo id whose file the hub's
model page has to pick (``owner/name``) is looked up once too: the store remembers the URL it
resolved to, so a cached adapter named by repo id still works while the hub is out of reach.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from urllib.parse import quote

from kiln.api.fetch import fetch_file
from kiln.api.services import Services
from kiln.engine.request import LoraRef
from kiln.errors import InvalidLora

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:/(?P<file>[\w./-]{1,200}\.safetensors))?$")
PREFERRED_FILES = ("pytorch_lora_weights.safetensors", "lora.safetensors")
REVISION = "main"  # a repo id names no revision; its default branch


async def resolve_loras(svc: Services, items: list[tuple[str, float]], *, field: str, repo_ids: bool) -> tuple[LoraRef, ...]:
    """``(url or repo id, weight)`` pairs -> refs to checked, cached adapter files, in order."""
    if not items:
        return ()
    if svc.loras is None:
        raise InvalidLora(f"{field}: this server keeps no LoRA store; send the request without {field}",
                          details={"field": field})
    refs = await asyncio.gather(*(
        _one(svc, source.strip(), weight, field=f"{field}[{i}]", repo_ids=repo_ids) for i, (source, weight) in enumerate(items)
    ))
    if svc.lora_share is not None:  # scale-out: the job may run on a worker on another machine
        for ref in refs:
            await asyncio.to_thread(svc.lora_share.publish, ref.sha256)
    return tuple(refs)


async def _one(svc: Services, source: str, weight: float, *, field: str, repo_ids: bool) -> LoraRef:
    store = svc.loras
    assert store is not None
    name = None  # a repo id whose file the hub's model page picks: remembered once its adapter is stored
    if source.lower().startswith(("http://", "https://")):
        url = source
    elif repo_ids and (match := REPO_ID.match(source)):
        url, name = await _hub_url(svc, match["repo"], match["file"], field)
    else:
        also = " or a Hugging Face repo id (owner/name)" if repo_ids else ""
        raise InvalidLora(f"{field}: {source[:200]!r} is not an http(s) URL of a .safetensors file{also}",
                          details={"field": field})
    sha = await asyncio.to_thread(store.for_url, url)
    if sha is None:
        fetched = await fetch_file(url, policy=svc.lora_policy, directory=store.root, field=field, noun="LoRA",
                                   error=InvalidLora)
        sha = await asyncio.to_thread(store.add, fetched.path, fetched.sha256, url=url, field=field)
    if name is not None:
        await asyncio.to_thread(store.remember_url, name, url)
    return LoraRef(sha256=sha, weight=weight, source=source[:2048])


async def _hub_url(svc: Services, repo: str, file: str | None, field: str) -> tuple[str, str | None]:
    """The download URL of the adapter in a Hugging Face model repository, and the name to remember it
    by when the hub had to be asked which file it is (None when the URL was known without asking)."""
    base = svc.settings.hf_endpoint
    if file is not None:
        return f"{base}/{quote(repo)}/resolve/{REVISION}/{quote(file)}", None
    assert svc.loras is not None
    # the endpoint is part of the name: an operator who moves to a mirror gets the mirror's URLs
    name = f"hf:{base}/{repo}@{REVISION}"
    url = await asyncio.to_thread(svc.loras.url_for, name)
    if url is not None:  # asked before: the hub may be down now, and the adapter is likely cached
        return url, None
    file = await _pick_file(svc, repo, field)
    return f"{base}/{quote(repo)}/resolve/{REVISION}/{quote(file)}", name


async def _pick_file(svc: Services, repo: str, field: str) -> str:
    policy = replace(svc.lora_policy, max_bytes=4 * 2**20, timeout_s=min(svc.lora_policy.timeout_s, 30.0))
    assert svc.loras is not None
    info = await fetch_file(f"{svc.settings.hf_endpoint}/api/models/{quote(repo)}", policy=policy,
                            directory=svc.loras.root, field=field, noun="Hugging Face model page",
                            error=InvalidLora, accept="application/json")
    try:
        data = json.loads(await asyncio.to_thread(info.path.read_bytes))
        names = [s["rfilename"] for s in data.get("siblings", []) if isinstance(s, dict) and isinstance(s.get("rfilename"), str)]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise InvalidLora(f"{field}: the Hugging Face page of {repo} could not be read", details={"field": field}) from None
    finally:
        info.path.unlink(missing_ok=True)
    candidates = [n for n in names if n.endswith(".safetensors")]
    if not candidates:
        raise InvalidLora(f"{field}: the Hugging Face repository {repo} holds no .safetensors file", details={"field": field})
    for preferred in PREFERRED_FILES:
        if preferred in candidates:
            return preferred
    if len(candidates) > 1:
        listed = ", ".join(candidates[:10])
        raise InvalidLora(f"{field}: {repo} holds several .safetensors files ({listed}); name one as {repo}/<file>",
                          details={"field": field, "files": candidates[:50]})
    return candidates[0]

"""``tunesmith cai``: Constitutional AI's supervised phase, turned into training data.

From a principles file (pairs of a critique request and a revision request) and a prompt file, a
model drafts an answer to each prompt, critiques its draft against a principle sampled for that
prompt, and revises the draft in the light of the critique, every step batched over the prompts
(Bai et al. 2022, https://arxiv.org/abs/2212.08073, section 3). It writes:

- ``sft.jsonl``: prompt -> revision as ``messages`` (for ``stage: sft``);
- ``preference.jsonl``: ``prompt``, ``chosen`` = revision, ``rejected`` = draft (for DPO and the
  reward model), only where the revision differs from the draft;
- ``summary.json``: rows, how many revisions differ from their draft, per principle.

Every row keeps its draft, principle, critique and revision for inspection. The model is any
:data:`Chat` callable: a local model through :func:`tunesmith.inference.generate`, or an
OpenAI-compatible endpoint on this machine (``tunesmith serve``, vLLM, llama.cpp's server).
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import atomic_folder
from tunesmith.data.readers import read_records
from tunesmith.inference.generate import generate

Conversation = list[dict[str, str]]
Chat = Callable[[list[Conversation]], list[str]]
PROMPT_FIELDS = ("prompt", "instruction", "question", "text")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Principle:
    """One principle: how to ask for a critique and how to ask for a revision."""

    name: str
    critique_request: str
    revision_request: str


@dataclass(frozen=True)
class CaiRow:
    """What happened to one prompt."""

    prompt: str
    principle: str
    draft: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str

    @property
    def revised(self) -> bool:
        return " ".join(self.revision.split()) != " ".join(self.draft.split()) and bool(self.revision.strip())


def read_principles(path: str | Path) -> list[Principle]:
    """Principles from a .jsonl/.json file: ``critique_request`` and ``revision_request`` (and ``name``) each.

    Raises:
        TunesmithError: If the file is missing or empty, or a record lacks a pair (naming its line).
    """
    principles = []
    for record in read_records(path):
        pair = [record.fields.get(key) for key in ("critique_request", "revision_request")]
        if not all(isinstance(text, str) and text.strip() for text in pair):
            raise TunesmithError(f"{record.where}: a principle needs a critique_request and a revision_request (texts); "
                                 f"fields present: {', '.join(record.fields) or 'none'}")
        name = record.fields.get("name") or f"principle {len(principles) + 1}"
        principles.append(Principle(str(name), pair[0].strip(), pair[1].strip()))
    if not principles:
        raise TunesmithError(f"principles file {path} holds no critique_request/revision_request pairs")
    return principles


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a data file: a ``prompt``/``instruction``/``question`` field, or one per line of a .txt.

    Raises:
        TunesmithError: If a record has no prompt field (naming its line) or the file is empty.
    """
    prompts = []
    for record in read_records(path):
        text = next((record.fields[k] for k in PROMPT_FIELDS if isinstance(record.fields.get(k), str)), None)
        if text is None:
            raise TunesmithError(f"{record.where}: no prompt; expected one of the fields {', '.join(PROMPT_FIELDS)}")
        if text.strip():
            prompts.append(text.strip())
    if not prompts:
        raise TunesmithError(f"prompt file {path} holds no prompts")
    return prompts


def critique_and_revise(chat: Chat, prompts: list[str], principles: list[Principle], seed: int = 0) -> list[CaiRow]:
    """Draft, critique against a sampled principle, revise: three batched calls of ``chat`` over all prompts."""
    sampler = random.Random(seed)
    chosen = [sampler.choice(principles) for _ in prompts]
    asked = [[{"role": "user", "content": prompt}] for prompt in prompts]
    drafts = chat(asked)
    critique_turns = [[*turns, {"role": "assistant", "content": draft}, {"role": "user", "content": p.critique_request}]
                      for turns, draft, p in zip(asked, drafts, chosen)]
    critiques = chat(critique_turns)
    revision_turns = [[*turns, {"role": "assistant", "content": critique}, {"role": "user", "content": p.revision_request}]
                      for turns, critique, p in zip(critique_turns, critiques, chosen)]
    revisions = chat(revision_turns)
    return [CaiRow(prompt, p.name, draft, p.critique_request, critique, p.revision_request, revision)
            for prompt, p, draft, critique, revision in zip(prompts, chosen, drafts, critiques, revisions)]


def summarise(rows: list[CaiRow]) -> dict:
    """Rows written, how many revisions differ from their drafts, overall and per principle."""
    per_principle: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = per_principle.setdefault(row.principle, {"rows": 0, "revised": 0})
        counts["rows"] += 1
        counts["revised"] += row.revised
    revised = sum(row.revised for row in rows)
    return {"rows": len(rows), "revised": revised, "share_revised": round(revised / max(len(rows), 1), 4),
            "preference_pairs": revised, "per_principle": per_principle}


def write_outputs(rows: list[CaiRow], out: Path, extra: Optional[dict] = None) -> dict:
    """Write sft.jsonl, preference.jsonl and summary.json into ``out``, whole or not at all."""
    summary = {**summarise(rows), **(extra or {})}
    with atomic_folder(out) as partial:
        with (partial / "sft.jsonl").open("w", encoding="utf-8") as sft, \
                (partial / "preference.jsonl").open("w", encoding="utf-8") as preference:
            for row in rows:
                kept = asdict(row)
                sft.write(json.dumps({"messages": [{"role": "user", "content": row.prompt},
                                                   {"role": "assistant", "content": row.revision}], **kept}) + "\n")
                if row.revised:  # a pair whose two sides are the same teaches nothing
                    preference.write(json.dumps({"prompt": row.prompt, "chosen": row.revision,
                                                 "rejected": row.draft, **kept}) + "\n")
        (partial / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def local_chat(model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.0, batch_size: int = 8) -> Chat:
    """A :data:`Chat` from a loaded causal LM (its chat template; greedy unless ``temperature`` > 0)."""

    def chat(conversations: list[Conversation]) -> list[str]:
        return generate(model, tokenizer, conversations, max_new_tokens, temperature, batch_size)

    return chat


def endpoint_chat(url: str, model_name: str, max_new_tokens: int = 256, temperature: float = 0.0,
                  api_key: Optional[str] = None, timeout: float = 600) -> Chat:
    """A :data:`Chat` from an OpenAI-compatible server on this machine (``POST {url}/chat/completions``).

    Raises:
        TunesmithError: If the URL is not on loopback (prompts never leave the machine), or a request fails.
    """
    host = urllib.parse.urlparse(url).hostname
    if host not in LOOPBACK:
        raise TunesmithError(f"--endpoint {url}: only a server on this machine (127.0.0.1, localhost, ::1) is used")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def one(conversation: Conversation) -> str:
        body = json.dumps({"model": model_name, "messages": conversation, "max_tokens": max_new_tokens,
                           "temperature": temperature}).encode()
        request = urllib.request.Request(url.rstrip("/") + "/chat/completions", body, headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"].strip()
        except (urllib.error.URLError, KeyError, ValueError) as error:
            raise TunesmithError(f"--endpoint {url}: the request failed ({error})") from None

    def chat(conversations: list[Conversation]) -> list[str]:
        return [one(conversation) for conversation in conversations]

    return chat


def run_cai(chat: Chat, principles_path: str, prompts_path: str, out: Path, seed: int = 0,
            limit: Optional[int] = None, overwrite: bool = False, say: Callable[[str], None] = print) -> dict:
    """The whole command: read, generate, write; returns the summary.

    Raises:
        TunesmithError: If ``out`` has content and ``overwrite`` is not set, or an input is malformed.
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TunesmithError(f"output folder {out} is not empty; choose another --out or pass --overwrite")
    principles, prompts = read_principles(principles_path), read_prompts(prompts_path)
    prompts = prompts[:limit] if limit else prompts
    say(f"cai: {len(prompts)} prompts, {len(principles)} principles: drafting, critiquing, revising ...")
    rows = critique_and_revise(chat, prompts, principles, seed)
    summary = write_outputs(rows, out, {"principles": str(principles_path), "prompts": str(prompts_path), "seed": seed})
    say(f"cai: wrote {summary['rows']} rows to {out / 'sft.jsonl'}; {summary['revised']} revised "
        f"({100 * summary['share_revised']:.1f}%) -> {summary['preference_pairs']} pairs in {out / 'preference.jsonl'}")
    return summary

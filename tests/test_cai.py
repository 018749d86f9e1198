"""``tunesmith cai`` on the session's tiny Llama: the draft -> critique -> revision chain, its two data sets, bad input, endpoints."""

from __future__ import annotations

import json
import shutil

import pytest

from tunesmith.core.errors import TunesmithError
from tunesmith.data.formats import preference_parts
from tunesmith.data.readers import read_records
from tunesmith.workflows.constitutional import critique_and_revise, local_chat, read_principles, read_prompts, run_cai

from conftest import REPO, run_cli

PRINCIPLES = REPO / "examples" / "cai" / "principles.jsonl"
PROMPTS = REPO / "examples" / "cai" / "prompts.jsonl"


def test_cai_writes_sft_and_preference_data_with_every_step_kept(tiny_llama, tmp_path):
    out = tmp_path / "cai"
    result = run_cli("cai", "--principles", str(PRINCIPLES), "--prompts", str(PROMPTS), "--out", str(out),
                     "--model", tiny_llama, "--max-new-tokens", "8", "--limit", "4")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "preference.jsonl").read_text().splitlines()]
    assert summary["rows"] == len(sft) == 4 and summary["revised"] == len(pairs)
    assert summary["share_revised"] == pytest.approx(len(pairs) / 4, abs=1e-4) and len(pairs) > 0
    assert f"{summary['revised']} revised" in result.stdout
    progress = [line for line in result.stderr.splitlines() if line.startswith(("tunesmith cai", "loading", "cai:"))]
    assert progress[:2] == ["tunesmith cai: loading torch and transformers ...", f"loading {tiny_llama} ..."]
    assert progress[-1] == "cai: replies: 12 done"  # 4 drafts, 4 critiques, 4 revisions: said batch by batch
    names = {p.name for p in read_principles(PRINCIPLES)}
    for row in sft:
        assert {"draft", "principle", "critique", "revision"} <= set(row) and row["principle"] in names
        assert row["messages"][1] == {"role": "assistant", "content": row["revision"]}
    for record, row in zip(read_records(out / "preference.jsonl"), pairs):  # the layout the preference reader takes
        prompt, chosen, rejected = preference_parts(record)
        assert (prompt[0]["content"], chosen, rejected) == (row["prompt"], row["revision"], row["draft"])
        assert chosen != rejected
    with pytest.raises(TunesmithError, match="not empty"):  # nothing written is replaced silently
        run_cai(lambda conversations: [""] * len(conversations), str(PRINCIPLES), str(PROMPTS), out)


def test_the_critique_sees_the_draft_and_the_revision_sees_the_critique(tiny_llama):
    from tunesmith.inference.generate import load_for_inference

    model, tokenizer = load_for_inference(tiny_llama)
    real = local_chat(model, tokenizer, max_new_tokens=8)
    seen = []

    def recording(conversations):
        seen.append(conversations)
        return real(conversations)

    principles = read_principles(PRINCIPLES)
    (row,) = critique_and_revise(recording, read_prompts(PROMPTS)[:1], principles, seed=3)
    draft_call, critique_call, revision_call = (calls[0] for calls in seen)
    principle = next(p for p in principles if p.name == row.principle)
    assert draft_call == [{"role": "user", "content": row.prompt}]
    assert critique_call[1:] == [{"role": "assistant", "content": row.draft},
                                 {"role": "user", "content": principle.critique_request}]
    assert revision_call[3:] == [{"role": "assistant", "content": row.critique},
                                 {"role": "user", "content": principle.revision_request}]


def test_a_principles_file_without_pairs_names_the_line(tmp_path, cli):
    path = tmp_path / "principles.jsonl"
    path.write_text(json.dumps({"critique_request": "a", "revision_request": "b"}) + "\n"
                    + json.dumps({"name": "half", "critique_request": "only a critique"}) + "\n")
    with pytest.raises(TunesmithError, match=r"principles.jsonl, line 2: a principle needs a critique_request and a "
                                             r"revision_request"):
        read_principles(path)
    result = cli("cai", "--principles", str(path), "--prompts", str(PROMPTS), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "line 2" in result.stderr and "Traceback" not in result.stderr


def test_only_a_loopback_endpoint_is_used():
    from tunesmith.workflows.constitutional import endpoint_chat

    with pytest.raises(TunesmithError, match="only a server on this machine"):
        endpoint_chat("http://example.com/v1", "m")


@pytest.mark.slow
def test_an_openai_compatible_endpoint_answers_as_the_local_model(tiny_llama, tmp_path):
    pytest.importorskip("fastapi")
    from tunesmith.inference.generate import load_for_inference
    from tunesmith.workflows.constitutional import endpoint_chat

    from serve_support import Server

    workspace = tmp_path / "workspace"
    (workspace / "models").mkdir(parents=True)
    shutil.copytree(tiny_llama, workspace / "models" / "tiny_llama")
    prompts = read_prompts(PROMPTS)[:2]
    model, tokenizer = load_for_inference(tiny_llama)
    expected = critique_and_revise(local_chat(model, tokenizer, max_new_tokens=8), prompts, read_principles(PRINCIPLES))
    server = Server(workspace).start()
    try:
        served = endpoint_chat(server.url + "/v1", "models/tiny_llama", max_new_tokens=8)
        assert critique_and_revise(served, prompts, read_principles(PRINCIPLES)) == expected
    finally:
        server.stop()

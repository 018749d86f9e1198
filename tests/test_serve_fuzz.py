"""Every route of ``tunesmith serve`` driven by schemathesis from the OpenAPI schema the server serves.

A real server on loopback, a random tiny model, a temporary workspace. Well-formed and malformed
requests (schemathesis' positive and negative generation); bounded per operation and in total.
Asserts: no 5xx, no traceback in the server's log, nothing written outside the workspace.
The figures it prints (requests, statuses) are recorded in docs/studio.md.
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tunesmith[serve]'")
schemathesis = pytest.importorskip("schemathesis", reason="needs schemathesis (the dev extra)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from serve_support import Server, make_workspace  # noqa: E402

pytestmark = pytest.mark.slow
EXAMPLES_PER_OPERATION = int(os.environ.get("TUNESMITH_FUZZ_EXAMPLES", "12"))
TOTAL_SECONDS = float(os.environ.get("TUNESMITH_FUZZ_SECONDS", "75"))


def tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def test_every_route_survives_schemathesis(tmp_path, tiny_llama, tiny_data):
    from schemathesis import GenerationMode

    workspace = make_workspace(tmp_path / "workspace", tiny_llama, tiny_data, records=16)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = {path for path in tree(tmp_path) if not path.startswith("workspace")}
    server = Server(workspace, cwd=cwd).start()
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    deadline = time.monotonic() + TOTAL_SECONDS
    try:
        schema = schemathesis.openapi.from_url(server.url + "/api/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 20  # every route of openai_api, studio_api and jobs_api
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
                @given(case=operation.as_strategy(generation_mode=mode))
                def drive(case):
                    if time.monotonic() > deadline:
                        return
                    response = case.call(base_url=server.url, timeout=60)
                    statuses[(operation.label, response.status_code)] += 1  # noqa: B023 (drive() runs in this iteration)
                    if response.status_code >= 500:
                        failures.append(f"{operation.label} {mode.value}: {response.status_code} {response.text[:300]}"  # noqa: B023
                                        f" for {case.body if case.body is not None else case.query}")

                try:
                    drive()
                except Unsatisfiable:
                    pass  # nothing to make malformed (an operation without parameters or body)
    finally:
        server.stop()
    log = next(workspace.glob("server-*.log")).read_text()
    codes = collections.Counter()
    for (_, code), count in statuses.items():
        codes[code] += count
    print(f"\nschemathesis: {sum(codes.values())} requests over {len(operations)} operations; statuses {dict(sorted(codes.items()))}")
    assert not failures, "\n".join(failures[:10])
    assert "Traceback" not in log, log[-3000:]
    after = {path for path in tree(tmp_path) if not path.startswith("workspace")}
    assert after == before and not list(cwd.iterdir()), sorted(after - before)
    assert sum(codes.values()) >= 100 and codes[200] > 0

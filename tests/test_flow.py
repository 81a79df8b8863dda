"""The flow of one request, pinned from every front end: a bad request gets one message through HTTP /schedule, the
ExApp worker (the real process against the fake Nextcloud) and the CLI; a request only the model refuses (a static
bundle asked for another size) comes back as *refused*, with that message, in both task services; an admin's
default changed while a task runs does not change that task; and how often one task is parsed and rebuilt."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fake_nextcloud import ExAppProcess, FakeNextcloud
from PIL import Image
from standalone_helpers import ALICE, USERS, Client, basic, load_service, wait_until

from backend.cli import cli
from backend.config import Settings
from backend.standalone.manager import TaskManager
from backend.standalone.server import StandaloneServer
from backend.standalone.task import Task, TaskStatus
from backend.tasks.outcome import INTERNAL_ERROR
from runtime.request import Defaults

#: The static bundle's only size; a request for another one is the model's to refuse, not the parser's.
REFUSED_SIZE = "384x384"
STATIC_REFUSAL = f"size {REFUSED_SIZE} is not allowed for this bundle"


@pytest.fixture(scope="module")
def static_bundle(onnx_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle as exported with static shapes for 256x256 only (the manifest says so)."""
    import shutil

    bundle = Path(shutil.copytree(onnx_bundle, tmp_path_factory.mktemp("flow") / "tiny-static"))
    manifest = bundle / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()),
                                    "static_shape": {"width": 256, "height": 256}}))
    return bundle


@pytest.fixture(scope="module")
def exapp(static_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeNextcloud]:
    fake = FakeNextcloud(version=33).start()  # 33+ carries the user-facing message apart from the admin's
    proc = ExAppProcess(fake, tmp_path_factory.mktemp("exapp") / "storage",
                        {"T2I_MODEL": str(static_bundle), "T2I_POLL_INTERVAL": "0.2", "T2I_THREADS": "1"})
    try:
        assert fake.install(proc)["progress"] == 100, proc.output()
        yield fake
    finally:
        proc.stop()
        fake.stop()


@pytest.fixture(scope="module")
def http(static_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    settings = Settings().updated(data_dir=tmp_path_factory.mktemp("standalone"), users=USERS, port=0, threads=1)
    server = StandaloneServer(settings, services=[load_service(static_bundle)])
    server.start()
    client = Client(server.url, basic(*ALICE))
    try:
        yield client
    finally:
        client.close()
        server.close()


def _exapp_user_error(fake: FakeNextcloud, task_input: dict[str, Any]) -> str:
    tid = fake.schedule({"input": "a fox", "numberOfImages": 1, **task_input}, check=False)
    task = fake.wait([tid])[0]
    assert task["status"] == "STATUS_FAILED", task
    return str(task["_user_error"])


@pytest.mark.parametrize(("task_input", "cli_args", "message"), [
    ({"steps": 1000}, ["--steps", "1000"], "steps 1000 is out of range; use 1 to 100"),
    ({"size": "100x100"}, ["--size", "100x100"], "width 100 is not allowed; use a multiple of 64 from 256 to 1024"),
    ({"scheduler": "heun"}, ["--scheduler", "heun"], "scheduler 'heun' is not known"),
])
def test_one_bad_request_one_message_through_every_protocol(exapp: FakeNextcloud, http: Client,
                                                            task_input: dict[str, Any], cli_args: list[str],
                                                            message: str) -> None:
    reply = http.schedule("a fox", **task_input)
    worker = _exapp_user_error(exapp, task_input)
    result = CliRunner().invoke(cli, ["generate", "a fox", "--model", "sd-turbo", "--offline", *cli_args])
    assert reply.status == 400 and message in reply.message, reply
    assert worker == reply.message, (worker, reply.message)
    assert result.exit_code != 0 and f"Error: {reply.message}" in result.output, result.output


def test_a_size_only_the_model_refuses_is_refused_in_both_services(exapp: FakeNextcloud, http: Client) -> None:
    # Parsing accepts 384x384; the bundle's static graphs do not. Both services must tell the user that their
    # request was refused and why, not report an internal error.
    reply = http.schedule("a fox", size=REFUSED_SIZE, steps=1)
    assert reply.status == 200, reply
    tid = reply.data["task"]["id"]
    done = wait_until(lambda: (t := http.get(f"task/{tid}").data["task"])["status"] == TaskStatus.FAILED and t,
                      60, what="the refused task")
    assert STATIC_REFUSAL in done["errorMessage"] and done["errorMessage"] != INTERNAL_ERROR, done
    user_error = _exapp_user_error(exapp, {"size": REFUSED_SIZE, "steps": 1})
    assert user_error == done["errorMessage"], (user_error, done)
    assert http.schedule("a fox", size="256x256", steps=1).status == 200  # the size it was exported for runs


def test_an_admin_default_changed_between_batches_does_not_change_the_task(onnx_bundle: Path) -> None:
    service = load_service(onnx_bundle)
    service.settings = service.settings.updated(max_batch=1)
    pipe = service.pipeline
    pipe.use_defaults(Defaults(steps=3, guidance=2.0))
    changed: list[int] = []

    def admin_saves_new_defaults() -> None:  # what the ExApp's settings loop does from its own thread meanwhile
        admin = threading.Thread(target=pipe.use_defaults, args=(Defaults(steps=2, guidance=5.0, width=320),))
        admin.start()
        admin.join()
        changed.append(len(changed))

    results = service.run(Task.new("a fox", "app", 3, "alice").request, between_batches=admin_saves_new_defaults)
    assert changed == [0, 1] and pipe.defaults.steps == 2  # the change was made, twice, between the batches
    metas = [Image.open(io.BytesIO(r.png)).text for r in results]
    assert [(m["steps"], m["guidance"], m["size"]) for m in metas] == [("3", "2.0", "256x256")] * 3, metas
    assert [r.seed for r in results] == [results[0].seed + i for i in range(3)]


def test_one_task_is_parsed_once_and_built_at_most_three_times(tmp_path: Path, onnx_bundle: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Acceptance counts of the standalone path: the codec parses a task once where it is made (plus once per read
    of the store, the persistence boundary), and a one-image task is constructed as a request at most 3 times."""
    import backend.standalone.rows as rows
    import backend.tasks.task_input as task_input
    from runtime.request import GenerationRequest

    counts: Counter[str] = Counter()
    in_store = [False]
    parse, store_parse, check = task_input.parse, rows.parse, GenerationRequest.__post_init__

    def counted_parse(raw: Any) -> Any:
        counts["parse"] += 1
        counts["unknown-key check"] += 1  # the codec's key check runs once per parse, and nowhere else
        return parse(raw)

    def counted_store_parse(raw: Any) -> Any:
        counts["store parse"] += 1
        in_store[0] = True
        try:
            return store_parse(raw)
        finally:
            in_store[0] = False

    def counted_check(self: Any) -> None:
        if not in_store[0] and self.prompt not in ("calibration", "defaults"):
            counts["construction"] += 1
        check(self)

    service = load_service(onnx_bundle)
    with TaskManager(tmp_path, services=[service]) as manager:
        monkeypatch.setattr(task_input, "parse", counted_parse)
        monkeypatch.setattr(rows, "parse", counted_store_parse)
        monkeypatch.setattr(GenerationRequest, "__post_init__", counted_check)
        task = manager.run_task(Task.new("a fox", "app", 1, "alice", options={"steps": 2}))
        monkeypatch.undo()
    assert task.status == TaskStatus.SUCCESSFUL
    assert (counts["parse"], counts["unknown-key check"]) == (1, 1), counts
    assert 1 <= counts["construction"] <= 3, counts
    assert counts["store parse"] >= 1, counts  # run_task reads the finished task back
    print(f"\none standalone one-image task: {dict(counts)}")


def test_run_task_classifies_every_ending(static_bundle: Path) -> None:
    """The one classification both services match on: images, refused, failed (with the detail for the admin),
    cancelled by the requester, stopped by the service."""
    from backend.tasks.outcome import Cancelled, Failed, Images, Refused, Stopped, run_task

    service = load_service(static_bundle)
    request = Task.new("a fox", "app", 1, "alice", options={"steps": 1}).request
    assert request is not None
    ok = run_task(service, request)
    assert isinstance(ok, Images) and len(ok.results) == 1
    refused = run_task(service, Task.new("a fox", "app", 1, "alice", options={"size": REFUSED_SIZE}).request)
    assert isinstance(refused, Refused) and STATIC_REFUSAL in refused.user

    def broken(fraction: float) -> bool:
        raise RuntimeError("a bug in a progress callback")

    failed = run_task(service, request, broken, label="task 7")
    assert isinstance(failed, Failed) and failed.user == INTERNAL_ERROR
    assert failed.admin.startswith("task 7 failed: RuntimeError: a bug in a progress callback [at ")
    assert run_task(service, request, lambda f: False, cancelled=lambda: True) == Cancelled()
    assert run_task(service, request, lambda f: False, cancelled=lambda: False) == Stopped()

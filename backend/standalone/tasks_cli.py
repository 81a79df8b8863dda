"""``text2image tasks list|show|delete|cleanup``: the standalone service's task store from the command line.

Imports only click and the standard library at module level, so ``text2image --help`` stays instant. Works while
the service runs (SQLite WAL); deleting a task that is being made stops it within a second.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import click

from runtime.validation import shown

_STATUS_NAMES = ["scheduled", "running", "successful", "failed"]
#: Task ids are SQLite rowids (64-bit); click names the value and this range when an id is outside it.
_TASK_ID = click.IntRange(1, 2**63 - 1)


def _store(data_dir: Path | None) -> Any:
    from backend.config import Settings
    from backend.standalone.store import TaskStore
    from runtime.errors import T2IError

    path = data_dir or Settings.from_env().standalone.data_dir
    try:
        return TaskStore(path, create=False)
    except T2IError as exc:
        raise click.ClickException(str(exc)) from None


def _json(text: Any) -> Any:
    """A stored JSON column, or its raw text when it is damaged (not JSON, nested too deeply)."""
    if isinstance(text, str) and text.startswith("(damaged"):
        return text
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return f"(damaged) {shown(text)}"


def _when(seconds: Any) -> str:
    if seconds is None:
        return "-"
    try:
        return dt.datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return f"(damaged) {shown(seconds)}"


_data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path),
    help="The service's data folder. Default: T2I_DATA_DIR or ~/.local/share/text2image-sd2/tasks.")


class _StoreErrors(click.Group):
    """Every ``tasks`` command: a store that cannot be used (damaged, full, read-only) is an error line."""

    def invoke(self, ctx: click.Context) -> Any:
        from runtime.errors import T2IError

        try:
            return super().invoke(ctx)
        except T2IError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_StoreErrors)
def tasks() -> None:
    """Look at and delete the tasks of the standalone service (text2image serve --standalone)."""


@tasks.command("list")
@_data_dir_option
@click.option("--user", help="Only this user's tasks.")
@click.option("--app", "app_id", help="Only this app's tasks.")
@click.option("--status", type=click.Choice(_STATUS_NAMES), help="Only tasks with this status.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (Nextcloud's task JSON).")
def list_tasks(data_dir: Path | None, user: str | None, app_id: str | None, status: str | None,
               as_json: bool) -> None:
    """List tasks, oldest first."""
    from backend.standalone.store import ANY_USER
    from backend.standalone.task import TaskStatus

    store = _store(data_dir)
    try:
        found = store.find(ANY_USER if user is None else user, app_id, None,
                           TaskStatus[status.upper()] if status else None)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([t.to_json() for t in found], indent=2, ensure_ascii=False))
        return
    for t in found:
        prompt = t.input if len(t.input) <= 50 else t.input[:47] + "..."
        click.echo(f"{t.id:>6}  {t.status.name:<10}  {_when(t.created_at)}  {t.user_id or '-'}/{t.app_id}  "
                   f"{t.number_of_images} image(s)  {prompt!r}")
    click.echo(f"{len(found)} task(s)", err=True)


@tasks.command()
@_data_dir_option
@click.argument("task_id", type=_TASK_ID)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(data_dir: Path | None, task_id: int, as_json: bool) -> None:
    """Show everything stored about task TASK_ID, with the paths of its images."""
    from backend.standalone.task import TaskStatus

    store = _store(data_dir)
    try:
        row = store.details(task_id)
        images = store.image_files(task_id) if row else []
    finally:
        store.close()
    if row is None:
        raise click.ClickException(f"there is no task {task_id}; `text2image tasks list` shows the tasks")
    row["status"] = TaskStatus(row["status"]).name if row["status"] in set(TaskStatus) else row["status"]
    row["options"], row["seeds"] = _json(row["options"]), _json(row["seeds"])
    row["images"] = [str(p) for p in images]
    if as_json:
        click.echo(json.dumps(row, indent=2, ensure_ascii=False))
        return
    for key, value in row.items():
        shown = _when(value) if key.endswith("_at") and key != "completion_expected_at" else value
        click.echo(f"{key}: {shown}")


@tasks.command()
@_data_dir_option
@click.argument("task_ids", type=_TASK_ID, nargs=-1, required=True)
def delete(data_dir: Path | None, task_ids: tuple[int, ...]) -> None:
    """Delete tasks and their images (a task being made stops)."""
    store = _store(data_dir)
    try:
        missing = [i for i in task_ids if not store.delete(i)]
    finally:
        store.close()
    for i in task_ids:
        if i not in missing:
            click.echo(f"deleted task {i}")
    if missing:
        raise click.ClickException(f"no task {', '.join(map(str, missing))}; nothing deleted for those")


@tasks.command()
@_data_dir_option
@click.option("--older-than-days", type=float, help="Default: T2I_TASK_MAX_AGE_DAYS (30).")
def cleanup(data_dir: Path | None, older_than_days: float | None) -> None:
    """Delete finished (successful or failed) tasks older than the given age, with their images."""
    from backend.config import Settings

    days = Settings.from_env().standalone.task_max_age_days if older_than_days is None else older_than_days
    if not math.isfinite(days) or days < 0:
        why = "is negative" if days < 0 and math.isfinite(days) else "is not a finite number"
        raise click.BadParameter(f"{days:g} {why}; give an age in days, 0 or more", param_hint="--older-than-days")
    store = _store(data_dir)
    try:
        removed = store.cleanup(days * 86400)
    finally:
        store.close()
    click.echo(f"deleted {len(removed)} finished task(s) older than {days:g} days")

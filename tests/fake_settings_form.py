"""AppAPI's declarative settings forms (``ui/settings``) in the fake Nextcloud, checked as Nextcloud 32 checks a
declarative settings schema (``OC\\Settings\\DeclarativeManager``)."""

from __future__ import annotations

import threading
from typing import Any


class SettingsForms:
    """The forms an ExApp registered, by form id."""

    def __init__(self) -> None:
        self.forms: dict[str, dict] = {}
        self.lock = threading.Lock()

    def handle(self, method: str, query: dict, body: Any) -> tuple[int, Any, bool]:
        """AppAPI's ``ui/settings``: POST registers or replaces a form (checked as Nextcloud's declarative settings
        check a schema), GET and DELETE by ``formId``."""
        if method == "POST":
            form = (body or {}).get("formScheme")
            if not isinstance(form, dict) or form_problem(form):
                return 200, (400, {"message": form_problem(form) if isinstance(form, dict) else "no formScheme"}), True
            with self.lock:
                self.forms[form["id"]] = form
            return 200, (100, []), True
        with self.lock:
            form = self.forms.get(query.get("formId", ""))
            if form is None:
                return 200, (404, []), True
            if method == "DELETE":
                del self.forms[form["id"]]
                return 200, (100, []), True
            return 200, (100, form), True

#: Nextcloud's declarative settings field types (OCP\\Settings\\DeclarativeSettingsTypes).
FIELD_TYPES = ("text", "password", "email", "tel", "url", "number", "checkbox", "multi-checkbox", "radio", "select",
               "multi-select")

def form_problem(form: dict) -> str:
    """What Nextcloud 32 would refuse in a declarative settings schema, or ""."""
    for key in ("id", "priority", "section_type", "section_id", "title", "fields"):
        if key not in form:
            return f"missing {key}"
    if form["section_type"] not in ("admin", "personal"):
        return f"section_type {form['section_type']!r}"
    ids = set()
    for f in form["fields"]:
        if not all(isinstance(f.get(k), str) and f.get(k) for k in ("id", "title", "type")) or "default" not in f:
            return f"field {f} lacks id, title, type or default"
        if f["type"] not in FIELD_TYPES:
            return f"field {f['id']}: type {f['type']!r}"
        if f["id"] in ids:
            return f"field id {f['id']} twice"
        ids.add(f["id"])
        options = f.get("options")
        if f["type"] in ("select", "multi-select") and not (options and all(isinstance(o, str) for o in options)):
            return f"field {f['id']}: a select needs a list of option strings"
        if f["type"] in ("radio", "multi-checkbox") and not (
                options and all(isinstance(o, dict) and {"name", "value"} <= set(o) for o in options)):
            return f"field {f['id']}: needs options with name and value"
    return ""

"""AppAPI's declarative settings forms (``ui/settings``) in the fake Nextcloud, checked as Nextcloud 32 checks a
declarative settings schema (``OC\\Settings\\DeclarativeManager``), and the settings page's side: its load
(``GET …/declarative/forms``, each field with its value) and its save (``POST …/declarative/value``).

As measured on Nextcloud 32.0.1 + AppAPI 32.0.0: the page sends ``formId`` as the form's id with the ``<appid>_``
prefix removed, AppAPI looks the form up by exactly that id and, finding none, stores nothing (the answer is 200
all the same); a stored value is a string (PHP's cast: true "1", false and null "", 30 "30", text verbatim)."""

from __future__ import annotations

import base64
import json
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

    def page(self, method: str, path: str, headers: Any, app_id: str, body: Any,
             config: dict[str, str]) -> tuple[int, Any, bool]:
        """The settings page's requests, as the admin (basic auth; the fake keeps no passwords)."""
        try:
            user = base64.b64decode(headers.get("Authorization", "")[6:]).decode().split(":", 1)[0]
        except Exception:
            user = ""
        if headers.get("OCS-APIRequest") != "true" or user != "admin":
            return 401, (997, {"message": "Current user is not logged in"}), False
        if path.endswith("/value") and method == "POST":
            return self.page_save(app_id, body, config)
        if path.endswith("/forms") and method == "GET":
            return self.page_load(app_id, config)
        return 404, (998, {"message": "Not found"}), False

    def page_form_id(self, app_id: str, field_id: str) -> str:
        """The ``formId`` Nextcloud's page sends for a field: ``form.id.replace(app + '_', '')``."""
        with self.lock:
            form = next((f for f in self.forms.values() if any(x.get("id") == field_id for x in f["fields"])), None)
        return "" if form is None else form["id"].replace(f"{app_id}_", "", 1)

    def page_save(self, app_id: str, body: Any, config: dict[str, str]) -> tuple[int, Any, bool]:
        """``POST /ocs/v2.php/settings/api/declarative/value``: AppAPI's SetValueListener finds the form by the
        ``formId`` sent and stores the value under the field id; an unknown field is 400, an unknown form 200."""
        body = body if isinstance(body, dict) else {}
        with self.lock:
            known = any(x.get("id") == body.get("fieldId") for f in self.forms.values() for x in f["fields"])
            form = self.forms.get(str(body.get("formId")))
        if body.get("app") != app_id or not known:
            return 400, (400, {"message": "Unknown field"}), False
        if form is not None:
            config[str(body["fieldId"])] = php_string(body.get("value"))
        return 200, (200, None), False

    def page_load(self, app_id: str, config: dict[str, str]) -> tuple[int, Any, bool]:
        """``GET /ocs/v2.php/settings/api/declarative/forms``: each form with its fields' values (the stored one,
        else the default: numbers JSON-encoded, anything else as it is)."""
        out = []
        with self.lock:
            for form in self.forms.values():
                fields = [{**f, "value": config[f["id"]] if f["id"] in config else
                           (json.dumps(f["default"]) if isinstance(f["default"], (int, float, list, dict))
                            and not isinstance(f["default"], bool) else f["default"])} for f in form["fields"]]
                out.append({**form, "fields": fields, "app": app_id})
        return 200, (200, out), False


def config_api(method: str, body: Any, app_id: str, config: dict[str, str]) -> tuple[int, Any, bool]:
    """AppAPI's ``ex-app/config``: POST sets one key, DELETE removes keys (404 when none was there)."""
    body = body if isinstance(body, dict) else {}
    if method == "POST":
        config[str(body["configKey"])] = php_string(body.get("configValue"))
        return 200, (100, {"appid": app_id, "configkey": body["configKey"],
                           "configvalue": config[str(body["configKey"])]}), True
    keys = [k for k in body.get("configKeys") or [] if k in config]
    for k in keys:
        del config[k]
    return 200, ((100, len(keys)) if keys else (404, [])), True


def php_string(value: Any) -> str:
    """A JSON value as AppAPI stores it in a string column (PHP's string cast)."""
    if value is True:
        return "1"
    if value is None or value is False:
        return ""
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    return str(value)


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

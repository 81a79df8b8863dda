"""The standalone task service: Nextcloud's Text-To-Image task API without Nextcloud.

- :mod:`backend.standalone.task` — the task model and statuses (``Task``, ``TaskStatus``);
- :mod:`backend.standalone.manager` — ``TaskManager``: Nextcloud's manager operations for Python callers;
- :mod:`backend.standalone.store` — the SQLite (WAL) store with the images beside it;
- :mod:`backend.standalone.server` — the OCS-style HTTP API (``text2image serve --standalone``);
- :mod:`backend.standalone.tasks_cli` — ``text2image tasks list|show|delete|cleanup``.

This package's ``__init__`` imports nothing so that the CLI stays instant.
"""

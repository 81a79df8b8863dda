"""Nextcloud ExApp: a ``core:text2image`` task-processing provider for Nextcloud Assistant (AppAPI + nc_py_api).

``text2image serve`` starts it (:func:`backend.nextcloud.app.serve`). Modules: ``app`` (HTTP routes, serve),
``exapp`` (life cycle), ``loader`` (models), ``provider`` (what is registered), ``worker`` (taking and running
tasks), ``delivery`` (getting results to Nextcloud), ``journal`` (tasks in hand, across crashes), ``client``
(the calls to Nextcloud).
"""

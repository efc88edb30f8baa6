"""The review platform: a multi-user web application for the refine -> confirm loop.

``metsflow review serve`` runs ``app.create_app`` (Starlette, served by uvicorn) over the
current round's review batch and the final QA sample (``catalog``). Persistent state (users,
sessions, assignments, audit log, comments) is one SQLite file next to the label store
(``db``); labels themselves live only in the label store, and every save goes through
``LabelStore.import_label`` with the same checks and provenance as ``metsflow al import``.
``assign`` spreads a batch over trainees. The server itself: ``service`` (shared state),
``policy`` (who may do what; pure), ``auth`` (sessions, CSRF, login), ``upload`` (bounded label
uploads), ``dashboard``, ``routes``, assembled by ``app``. The browser UI (NiiVue) is in
``static/`` and ``web/`` (npm).
"""

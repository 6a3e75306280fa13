"""`dpl ui`: a local web app over the Python API (Gradio).

`handlers` holds the plain functions the page's buttons call (tested without a browser), `app`
the page layout, the per-session state and the server. Like the CLI, the app only calls the
library: every number and picture it shows comes from `invert`, `edit`, `dpl_edit.metrics` and
`dpl_edit.io.pictures`.
"""

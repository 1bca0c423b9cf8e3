"""A web app: a reference photo and a driving video (or OpenPose JSON files) to an animation, in the browser.

    python -m magicpose_jax.app --checkpoint outputs/demo/runs/stage2      # then open http://127.0.0.1:7860/

Modules: `server` (Python's http.server: the page and a small JSON API), `studio` (inputs, the poses and animate
tasks, the model), `jobs` (job folders and state on disk, the worker thread), `pipeline` (driving frames -> pose
renders). The page is static/index.html with plain JavaScript: nothing is fetched from outside the server.
See docs/app.md.
"""

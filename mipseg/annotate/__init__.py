"""Stage ``mipseg_annotate``: draw the 2D annotations in the browser, pre-filled by what mipseg knows.

Modules
-------
store
    Which annotation files exist and what state they are in; validated, atomic saves that keep
    the previous version in ``annotationsTr/.history/``.
views
    The images the page draws on (MIPs with their depth maps, slices), cached per case.
prefill
    Starting drawings: threshold of the image, projection of a label set, a model's prediction;
    and the number of pixels a person would have to change from each.
model_prefill
    A trained model's predictions, computed in a background thread and cached per case.
server
    The Starlette application (routes, token check); ``annotate_api`` starts it with uvicorn.
static/
    The page (plain HTML, JavaScript and CSS, served by mipseg itself: no build step, no CDN).
"""

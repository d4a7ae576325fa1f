"""ILVR Studio's support code: everything app.py needs beyond its layout and wiring.

The sampling maths lives in the engine (``ilvr/``); this package turns widget values into engine calls
and engine results into files and page text. One module per concept, imported in this order (each only
uses the ones above it):

    models   which models may load, the model cache (one loaded copy per source), device labels
    inputs   uploaded images, the sketch pad and scribble masks; the app's limits on typed values
    jobs     a job (rows x seeds) and running it in a worker thread with streamed previews and Cancel
    tasks    the four tabs' job builders: generation, translation, paint, scribble
    status   text shown in the page: the model status line, run summaries, progress bars and ETAs
    outputs  where result files go, writing them (PNG settings embedded) and pruning old ones

Only app.py imports gradio. Bad input raises ``ValueError`` (``ImageError`` is one) or
``ModelLoadError`` with a message meant for the user; app.py shows those as ``gr.Error``.
"""

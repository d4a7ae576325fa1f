"""ILVR Studio's support code: everything app.py needs beyond its endpoints and wiring.

The sampling maths lives in the engine (``ilvr/``); this package turns widget values into engine calls
and engine results into files and page text. One module per concept, imported in this order (each only
uses the ones above it):

    public   what a server reachable from elsewhere allows: model paths, model limits, per-visitor caps
    models   which models may load, their limits checked before loading, the model cache (one loaded
             copy per source, failures remembered as messages), device labels
    inputs   uploaded images (pixel limit from the header), the sketch pad and scribble masks; the app's
             limits on typed values
    jobs     a job (rows x seeds) and running it in a worker thread with streamed previews and Cancel
    tasks    the four tabs' job builders: generation, translation, paint, scribble
    status   text shown in the page: the model status line, run summaries, progress bars and ETAs
    outputs  where result files go, writing them (PNG settings embedded) and pruning old ones
    components  the input components used in place of Gradio's (never raise; pixel limit before
                decoding) and the guards around endpoints (one run per session)   (imports gradio)
    ui       the page: the table of tabs and the widgets every tab shares                  (imports gradio)

Only app.py, studio/components.py and studio/ui.py import gradio. Bad input raises ``ValueError`` (``ImageError`` is one) or
``ModelLoadError`` with a message meant for the user; app.py shows those as ``gr.Error``.
"""

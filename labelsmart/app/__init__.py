"""The browser app: UI handlers on plain values (:mod:`~labelsmart.app.session`) and the Gradio layout."""

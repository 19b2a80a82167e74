"""`mimajax serve`: the web page (Gradio) for any trained checkpoint, drawn from its family's `ServedModel`."""

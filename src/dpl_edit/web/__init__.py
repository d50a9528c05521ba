"""`dpl serve`: a web page to invert once and edit many times, with the attention views.

:mod:`.workbench` does the work on the library's API (and is tested without a browser);
:mod:`.app` lays it out as a Gradio page.
"""
